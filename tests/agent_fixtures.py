"""Fixtures and helpers for node agent tests: one simulated A30 carved in two, task containers
labelled as the runner labels them (removed after the test)."""

from __future__ import annotations

import threading

import pytest

from prefect_mig.allocator import Allocator
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.launchers.docker import LABEL_PREFIX, cluster_labels
from prefect_mig.model import Layout

A30_TWO = "2g.12gb@0 + 2g.12gb@2"


@pytest.fixture
def a30(tmp_path):
    """node-a's GPU backend: one simulated A30 carved as `A30_TWO`."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        yield backend


@pytest.fixture
def containers(docker_client):
    """A list the test appends the containers it starts to; they are removed after it."""
    started = []
    yield started
    for c in started:
        try:
            c.remove(force=True)
        except Exception:  # noqa: BLE001 - the test (or the agent) removed it already
            pass


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


def run_in_thread(agent, stop: threading.Event, *, interval_s: float = 0.2) -> tuple[threading.Thread, list]:
    """Run `agent` (`NodeAgent.run`) in a daemon thread until `stop` is set: (the thread, a list that gets
    the exception that ended its loop, if one did)."""
    raised: list = []

    def target():
        try:
            agent.run(interval_s=interval_s, stop=stop)
        except Exception as exc:  # noqa: BLE001 - the test looks at what ended it
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, raised
