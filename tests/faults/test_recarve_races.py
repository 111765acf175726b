"""Re-carving never destroys a slice in use and never leaves one out of service for good, whoever
else writes the desired layout meanwhile (`prefect-mig layout apply`, a second repartitioner, an
agent restarted between the two halves of a change). Real Redis, the simulated NVML."""

from __future__ import annotations

import time

import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.errors import WaitTimeout
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout

A30_TWO = "2g.12gb@0 + 2g.12gb@2"


@pytest.fixture
def node(fresh_redis_server, namespace, tmp_path):
    """node-a: one simulated A30 carved in two, its agent (no engine) and the allocator."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        alloc = Allocator(fresh_redis_server.client(), namespace)
        agent = NodeAgent(backend, alloc, node="node-a")
        agent.publish()
        yield alloc, backend, agent, backend.gpus()[0].uuid


def mig_uuids(backend) -> set[str]:
    return {m.mig_uuid for m in backend.instances(0)}


def test_a_desired_layout_replaced_between_the_two_halves_destroys_no_leased_slice(node):
    alloc, backend, agent, gpu = node
    alloc.set_desired(gpu, "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3", kind="incremental")  # re-carves @2
    assert agent.begin_desired(0, gpu) == "ready"  # 2g@2 withdrawn
    held = alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=300), timeout_s=5)  # 2g@0, not doomed
    alloc.set_desired(gpu, "1g.6gb@0 + 1g.6gb@1 + 2g.12gb@2", kind="incremental")  # a second writer: re-carves @0
    assert agent.finish_desired(0, gpu) == "changed"
    assert held.slice.mig_uuid in mig_uuids(backend)  # the leased slice was not destroyed
    assert alloc.lease(held.lease_id).fence == held.fence
    assert agent.apply_desired(0, gpu) == "skipped"  # begun again: its slice @0 is leased
    # and the 2g@2 the first layout withdrew is back in service, not withdrawn for good
    other = alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=30), timeout_s=5)
    assert other.slice.start == 2
    for lease in (held, other):
        alloc.release(lease.lease_id, lease.fence)


def test_a_pending_drain_whose_desired_layout_is_replaced_leaves_no_slice_withdrawn(node):
    alloc, backend, agent, gpu = node
    held = alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=300), timeout_s=5)
    alloc.set_desired(gpu, "1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3", kind="drain")
    assert agent.apply_desired(0, gpu) == "draining"  # the idle 2g is withdrawn, the leased one waits
    alloc.set_desired(gpu, A30_TWO, kind="incremental")  # someone wants the layout as it is
    assert agent.apply_desired(0, gpu) == "applied"  # already in place
    alloc.release(held.lease_id, held.fence)
    for _ in range(3):
        agent.tick()
    assert alloc.desired(gpu) is None
    assert {s["state"] for s in alloc.status()["slices"]} == {"free"}
    got = [alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=30), timeout_s=5) for _ in range(2)]
    for lease in got:
        alloc.release(lease.lease_id, lease.fence)


def test_a_slice_quarantined_after_its_holder_expired_is_not_re_carved_from_under_its_container(node):
    """Its holder's container may still run until the node's agent confirms it gone: the re-carve
    waits (an incremental one is skipped), as for a leased slice."""
    alloc, backend, agent, gpu = node
    # a node whose agent fences containers publishes how long an expired lease's slice waits for it
    alloc.publish("node-a", *agent.inventory(), heartbeat_ttl_s=30, fence_settle_s=300)
    lease = alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=1), timeout_s=5)  # nobody renews it
    time.sleep(1.3)
    alloc.reap()
    (row,) = [s for s in alloc.status()["slices"] if s["id"] == lease.slice.mig_uuid]
    assert row["state"] == "quarantined"
    doomed_start = lease.slice.start
    keep = 2 - doomed_start  # the other 2g slice stays
    alloc.set_desired(gpu, f"2g.12gb@{keep} + 1g.6gb@{doomed_start} + 1g.6gb@{doomed_start + 1}", kind="incremental")
    assert agent.apply_desired(0, gpu) == "skipped"
    assert lease.slice.mig_uuid in mig_uuids(backend)
    free = alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=30), timeout_s=5)  # the other 2g
    assert free.slice.start == keep
    with pytest.raises(WaitTimeout):  # the quarantined one is still granted to nobody
        alloc.acquire(SliceRequest(profile="2g.12gb", ttl_s=30), timeout_s=1)
    alloc.release(free.lease_id, free.fence)


def test_a_slice_a_task_container_runs_on_is_not_re_carved_whatever_its_cluster_id(
    node, docker_client, python_image, containers
):
    """A container the agent saw on a slice (here one of a cluster id it does not know: another
    cluster's, or its own from before Redis lost its data) keeps the slice out of a re-carve."""
    from prefect_mig.launchers.docker import LABEL_PREFIX, cluster_labels

    alloc, backend, agent, gpu = node
    agent.docker = docker_client
    (busy,) = [m for m in backend.instances(0) if m.placement.start == 2]
    labels = {**cluster_labels(cluster_id="not-this-clusters", namespace=alloc.keys.namespace, node="node-a"),
              "mig-uuid": busy.mig_uuid, "lease-id": "elsewhere", "fence": "1"}
    containers.append(docker_client.containers.run(
        python_image, ["sleep", "120"], detach=True, network_disabled=True,
        labels={LABEL_PREFIX + k: v for k, v in labels.items()},
    ))
    agent.tick()
    assert {s["id"]: s["state"] for s in alloc.status()["slices"]}[busy.mig_uuid] == "unavailable"
    alloc.set_desired(gpu, "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3", kind="incremental")
    assert agent.apply_desired(0, gpu) == "skipped"
    assert busy.mig_uuid in mig_uuids(backend)
