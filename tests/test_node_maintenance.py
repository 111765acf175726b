"""Node maintenance on a real redis-server: `prefect-mig node drain|resume` and what `status` shows."""

from __future__ import annotations

import json
import threading
import time

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.allocator.maintenance import drain_node, drained_nodes, holders
from prefect_mig.errors import ConfigError, LeaseLost, NoCapacity, Unsatisfiable

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


def test_node_forget_removes_a_renamed_nodes_old_name_from_status_and_leaves_its_gpu_to_the_new_name(
    cli_env, redis_client, namespace, tmp_path
):
    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout

    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path / "gpus")) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", HALVES["node-a"][0]))
        cluster = Allocator(redis_client, namespace)
        NodeAgent(backend, cluster, node="gpu-host", heartbeat_ttl_s=1).publish()  # before PREFECT_MIG_NODE was set
        NodeAgent(backend, cluster, node="gpu-3", heartbeat_ttl_s=600).publish()  # its agent, renamed
    time.sleep(1.5)  # the old name's heartbeat lapsed
    assert "prefect-mig node forget gpu-host" in _cli("status", env=cli_env).stdout  # STALE, and what to do

    forgot = _cli("node", "forget", "gpu-host", env=cli_env)
    assert forgot.returncode == 0, forgot.stderr
    assert "node gpu-host forgotten: 0 slice(s) and 0 GPU(s)" in forgot.stdout
    shown = _cli("status", env=cli_env).stdout
    assert "gpu-host" not in shown and "agent gpu-3: last heartbeat" in shown
    assert [(s["node"], s["state"]) for s in cluster.status()["slices"]] == [("gpu-3", "free")] * 2
    assert cluster.try_acquire(two_g()).slice.node == "gpu-3"
    again = _cli("node", "forget", "gpu-host", env=cli_env)
    assert again.returncode == 2 and "'gpu-host'" in again.stderr and "gpu-3" in again.stderr


def test_node_forget_refuses_a_node_an_agent_claims_or_with_a_lease_held_naming_what_holds_it(
    cli_env, redis_client, namespace
):
    cluster = Allocator(redis_client, namespace)
    cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    held = cluster.try_acquire(two_g(node="node-b", holder="nightly-train"))
    cluster.claim_node("node-a", '{"host": "gpu-7", "pid": 4242, "node": "node-a"}', ttl_s=600)
    before = cluster.status()["slices"]

    claimed = _cli("node", "forget", "node-a", env=cli_env)
    assert claimed.returncode == 1
    assert "node node-a cannot be forgotten" in claimed.stderr and "pid 4242 on host gpu-7" in claimed.stderr
    leased = _cli("node", "forget", "node-b", env=cli_env)
    assert leased.returncode == 1
    assert "node node-b cannot be forgotten" in leased.stderr and held.lease_id in leased.stderr
    assert cluster.status()["slices"] == before  # nothing removed

    cluster.release(held.lease_id, held.fence)
    assert cluster.forget_node("node-b") == (2, 1)  # taken out of the fleet: its idle slices go too
    assert {s["node"] for s in cluster.status()["slices"]} == {"node-a"}
    with pytest.raises(Unsatisfiable):
        cluster.try_acquire(two_g(node="node-b"))


def test_node_forget_refuses_while_an_agent_of_another_node_name_claims_one_of_its_gpus(redis_client, namespace):
    from prefect_mig.errors import NodeInUse

    cluster = Allocator(redis_client, namespace)
    slices = cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    (gpu,) = {s.gpu_uuid for s in slices if s.node == "node-b"}
    agent = '{"host": "gpu-7", "pid": 4242, "node": "gpu-7"}'
    cluster.claim_node("gpu-7", agent, ttl_s=600, gpus=[gpu])  # the node renamed: its agent runs under the new name
    with pytest.raises(NodeInUse) as refused:
        cluster.forget_node("node-b")
    assert f"claims GPU {gpu}" in str(refused.value) and "pid 4242 on host gpu-7" in str(refused.value)
    assert len(cluster.status()["slices"]) == 4
    cluster.release_node_claim("gpu-7", agent, gpus=[gpu])
    assert cluster.forget_node("node-b") == (2, 1)


def test_node_forget_is_passed_every_key_it_touches_and_refuses_a_gpu_set_that_changed_since_read(
    redis_client, namespace
):
    """Redis Cluster routes a script by the keys it is passed, so the caller reads the node's GPUs and
    passes their claims; a GPU published under the node after that read makes the script change
    nothing (the caller reads them again)."""
    from pathlib import Path

    lua = (Path(__file__).parents[1] / "prefect_mig" / "allocator" / "lua" / "forget_node.lua").read_text()
    assert "gpu_agent_key" not in lua and "node_slices_key" not in lua and "forgotten:" not in lua
    cluster = Allocator(redis_client, namespace)
    slices = cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    (gpu,) = {s.gpu_uuid for s in slices if s.node == "node-b"}
    k = cluster.keys
    before = cluster.status()["slices"]
    for stale in ([], [gpu, "GPU-gone"]):
        keys = (k.agent("node-b"), k.node_slices("node-b"), k.forgotten("node-b"), *(k.gpu_agent(g) for g in stale))
        assert cluster._run("forget_node", "node-b", "", *stale, action="forget", keys=keys) == ["changed"]
    assert cluster.status()["slices"] == before
    assert cluster.forget_node("node-b") == (2, 1)


def test_node_forget_drops_the_desired_layouts_of_the_gpus_it_forgets(redis_client, namespace):
    """A desired layout left for a forgotten GPU would be carved, unasked, if the GPU came back."""
    cluster = Allocator(redis_client, namespace)
    slices = cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    gone, kept = ({s.gpu_uuid for s in slices if s.node == node} for node in ("node-b", "node-a"))
    for gpu in gone | kept:
        cluster.set_desired(gpu, "4g.24gb@0", kind="incremental")
    cluster.forget_node("node-b")
    assert [cluster.desired(gpu) for gpu in gone] == [None] * len(gone)
    assert all(cluster.desired(gpu) for gpu in kept)  # another node's stay


def _words(text: str) -> str:
    """`text` with the console's line wrapping undone."""
    return " ".join(text.split())


def _dead_host(redis_client, namespace, tmp_path, docker_client, *, lease_ttl_s: float):
    """gpu-3 published by an agent that fences task containers, one slice leased for `lease_ttl_s`;
    then the host dies: its agent's heartbeat lapses and nobody runs there. Returns (allocator, lease)."""
    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout

    cluster = Allocator(redis_client, namespace)
    with GpuBackend(SimulatedNvml("gpu-3=1xA30-24GB", state_dir=tmp_path / "gpus")) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", HALVES["node-a"][0]))
        NodeAgent(backend, cluster, node="gpu-3", docker_client=docker_client, heartbeat_ttl_s=1,
                  fence_settle_s=600).publish()
    held = cluster.try_acquire(two_g(holder="nightly-train", ttl_s=lease_ttl_s))
    time.sleep(1.5)
    return cluster, held


def test_node_forget_of_a_dead_host_with_an_expired_holder_needs_host_is_gone_and_says_so(
    cli_env, redis_client, namespace, tmp_path, docker_client
):
    """Nobody will ever fence the expired holder's container on a host gone for good: plain forget
    refuses, naming the flag (and `status` points to it), instead of a loop between the two."""
    cluster, dead = _dead_host(redis_client, namespace, tmp_path, docker_client, lease_ttl_s=1)
    assert "prefect-mig node forget gpu-3 --host-is-gone" in _words(_cli("status", env=cli_env).stdout)
    watched = _cli("status", "--watch", "--refreshes", "1", env=cli_env).stdout
    assert "prefect-mig node forget gpu-3 --host-is-gone" in _words(watched)  # the live view says it too

    plain = _cli("node", "forget", "gpu-3", env=cli_env)
    assert plain.returncode == 1
    assert "awaits the fencing of its expired holder's task container" in _words(plain.stderr)  # the lease was reaped
    assert "prefect-mig node forget gpu-3 --host-is-gone" in _words(plain.stderr)
    assert len(cluster.status()["slices"]) == 2

    gone = _cli("node", "forget", "gpu-3", "--host-is-gone", env=cli_env)
    assert gone.returncode == 0, gone.stderr
    assert "node gpu-3 forgotten: 2 slice(s) and 1 GPU(s)" in _words(gone.stdout)
    assert "granted only after its agent removed any old task container" in _words(gone.stdout)
    shown = _cli("status", env=cli_env).stdout
    assert "gpu-3" not in shown
    assert cluster.status()["slices"] == [] and cluster.gpus() == []
    with pytest.raises(LeaseLost):
        cluster.lease(dead.lease_id)


def test_a_live_lease_blocks_node_forget_even_with_host_is_gone_naming_it_and_how_to_end_it(
    cli_env, redis_client, namespace, tmp_path, docker_client
):
    cluster, held = _dead_host(redis_client, namespace, tmp_path, docker_client, lease_ttl_s=600)
    before = cluster.status()["slices"]
    refused = _cli("node", "forget", "gpu-3", "--host-is-gone", env=cli_env)
    assert refused.returncode == 1
    assert held.lease_id in _words(refused.stderr) and "even with --host-is-gone" in _words(refused.stderr)
    assert "prefect-mig lease revoke" in _words(refused.stderr)
    assert cluster.status()["slices"] == before  # nothing removed
    assert not redis_client.exists(cluster.keys.forgotten("gpu-3"))


def test_a_node_forgotten_as_gone_that_has_no_fencing_agent_is_granted_at_once_when_published_again(
    redis_client, namespace
):
    """Without an agent that fences task containers (a simulated fleet) nobody would ever settle a
    held slice: such a node comes back as after an expiry there, offered at once."""
    cluster = Allocator(redis_client, namespace)
    cluster.publish_fleet(TWO_NODES, layouts=HALVES, heartbeat_ttl_s=600)
    assert cluster.forget_node("node-b", host_is_gone=True) == (2, 1)
    assert redis_client.exists(cluster.keys.forgotten("node-b"))
    cluster.publish_fleet("node-b=1xA30-24GB", layouts=HALVES, heartbeat_ttl_s=600)
    assert not redis_client.exists(cluster.keys.forgotten("node-b"))
    assert {s["state"] for s in cluster.status()["slices"] if s["node"] == "node-b"} == {"free"}
    assert cluster.try_acquire(two_g(node="node-b")).slice.node == "node-b"
