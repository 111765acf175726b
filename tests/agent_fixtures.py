"""Helpers for node agent tests: task containers labelled as the runner labels them."""

from __future__ import annotations

from prefect_mig.allocator import Allocator
from prefect_mig.launchers.docker import LABEL_PREFIX, cluster_labels


def start_task_container(docker_client, image: str, alloc: Allocator, *, lease_id: str, fence, node: str = "node-a",
                         mig_uuid: str = "MIG-none", command: tuple[str, ...] = ("sleep", "120")):
    """A sleeping container with the labels `MigTaskRunner` gives a task container of `alloc`'s cluster."""
    labels = {
        **cluster_labels(cluster_id=alloc.cluster_id(), namespace=alloc.keys.namespace, node=node),
        "lease-id": lease_id,
        "fence": str(fence),
        "mig-uuid": mig_uuid,
    }
    return docker_client.containers.run(
        image, list(command), detach=True, network_disabled=True,
        labels={LABEL_PREFIX + k: v for k, v in labels.items()},
    )
