"""Node maintenance on a real redis-server: `prefect-mig node drain|resume` and what `status` shows."""

from __future__ import annotations

import json
import threading

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.allocator.maintenance import drain_node, drained_nodes, holders
from prefect_mig.errors import ConfigError, LeaseLost, NoCapacity

from .test_agent_and_lease_cli import _cli, cli_env  # noqa: F401 - cli_env is a fixture

TWO_NODES = "node-a=1xA30-24GB,node-b=1xA30-24GB"
HALVES = {"node-a": ["2g.12gb@0 + 2g.12gb@2"], "node-b": ["2g.12gb@0 + 2g.12gb@2"]}


def two_g(**kw) -> SliceRequest:
    return SliceRequest(profile="2g.12gb", **kw)


@pytest.fixture
def two_nodes(alloc) -> Allocator:
    alloc.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=60)
    return alloc


def _granted(alloc, queued) -> str | None:
    """The node the queued request got a slice on, or None while it waits."""
    try:
        return alloc.lease(queued.request_id).slice.node
    except LeaseLost:
        return None


def test_a_drained_node_grants_nothing_new_while_its_leases_run_on_until_resumed(two_nodes):
    held = two_nodes.try_acquire(two_g(node="node-b", holder="train/1"))
    assert [row["holder"] for row in drain_node(two_nodes, "node-b")] == ["train/1"]
    got = [two_nodes.try_acquire(two_g()) for _ in range(2)]
    assert {g.slice.node for g in got} == {"node-a"}  # node-b's free slice is not granted
    with pytest.raises(NoCapacity):
        two_nodes.try_acquire(two_g())
    queued = two_nodes.try_acquire(two_g(), wait=True)
    two_nodes.renew(held.lease_id, held.fence, 60)  # running work is not disturbed
    two_nodes.release(held.lease_id, held.fence)
    assert _granted(two_nodes, queued) is None  # the slice it freed stays out of service
    assert holders(two_nodes, "node-b") == []
    states = {s["state"] for s in two_nodes.status()["slices"] if s["node"] == "node-b"}
    assert states == {"draining"}
    two_nodes.drain_node("node-b", drain=False)
    assert _granted(two_nodes, queued) == "node-b"


def test_a_drained_node_stays_drained_across_publish_heartbeat_loss_and_a_gpu_resume(two_nodes, clock):
    drain_node(two_nodes, "node-b")
    two_nodes.publish_fleet("node-b=1xA30-24GB", layouts=HALVES, heartbeat_ttl_s=5)  # the agent republishes
    clock.advance(6)
    assert two_nodes.reap()[2] == 1  # node-b's heartbeat lapsed
    two_nodes.heartbeat("node-a", ttl_s=60)
    assert two_nodes.heartbeat("node-b", ttl_s=60) == "back"
    gpu_b = next(g["uuid"] for g in two_nodes.gpus() if g["node"] == "node-b")
    two_nodes.drain(gpu_b)
    two_nodes.resume(gpu_b)  # the repartitioner's GPU resume does not undo the node drain
    assert {two_nodes.try_acquire(two_g()).slice.node for _ in range(2)} == {"node-a"}
    with pytest.raises(NoCapacity):
        two_nodes.try_acquire(two_g())
    assert two_nodes.status()["nodes"]["node-b"]["drained"] and drained_nodes(two_nodes) == ["node-b"]


def test_a_request_does_not_revoke_a_lease_on_a_drained_node(two_nodes):
    low = [two_nodes.try_acquire(two_g(node=n, priority=1, preemptible=True)) for n in ("node-b", "node-b")]
    drain_node(two_nodes, "node-b")
    for n in ("node-a", "node-a"):
        two_nodes.try_acquire(two_g(node=n, priority=5, preemptible=False))
    two_nodes.try_acquire(two_g(priority=9), wait=True)
    for lease in low:  # revoking would free a slice nobody may be granted
        assert not two_nodes.lease(lease.lease_id).revoked


def test_draining_a_node_that_never_published_names_it_and_the_published_ones(two_nodes):
    with pytest.raises(ConfigError) as caught:
        two_nodes.drain_node("node-c")
    assert caught.value.field == "node" and caught.value.value == "node-c"
    assert "'node-c'" in str(caught.value) and "node-a, node-b" in str(caught.value)
    assert drained_nodes(two_nodes) == []




def test_node_drain_reports_holders_waits_for_them_and_status_shows_it_until_resume(cli_env, redis_client, namespace):
    cluster = Allocator(redis_client, namespace)
    cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    held = cluster.try_acquire(two_g(node="node-b", holder="nightly-train", ttl_s=600))

    told = _cli("node", "drain", "node-b", env=cli_env)
    assert told.returncode == 0, told.stderr
    assert "1 lease(s) still held" in told.stdout and "nightly-train" in told.stdout
    timed_out = _cli("node", "drain", "node-b", "--wait", "--timeout", "1", env=cli_env)
    assert timed_out.returncode == 1 and "nightly-train" in timed_out.stdout and "within 1 s" in timed_out.stderr
    shown = _cli("status", env=cli_env)
    assert "node node-b: DRAINED" in shown.stdout and "node node-a: DRAINED" not in shown.stdout
    assert json.loads(_cli("status", "--json", env=cli_env).stdout)["nodes"]["node-b"]["drained"] is True

    releaser = threading.Timer(2.0, cluster.release, args=(held.lease_id, held.fence))
    releaser.start()
    try:
        waited = _cli("node", "drain", "node-b", "--wait", "--timeout", "60", "--json", env=cli_env)
    finally:
        releaser.cancel()
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout) == {"node": "node-b", "drained": True, "leases": []}
    with pytest.raises(NoCapacity):
        cluster.try_acquire(two_g(node="node-b"))

    assert _cli("node", "resume", "node-b", env=cli_env).returncode == 0
    assert "DRAINED" not in _cli("status", env=cli_env).stdout
    assert cluster.try_acquire(two_g(node="node-b")).slice.node == "node-b"
    unknown = _cli("node", "drain", "node-x", env=cli_env)
    assert unknown.returncode == 2 and "'node-x'" in unknown.stderr and "node-a, node-b" in unknown.stderr
