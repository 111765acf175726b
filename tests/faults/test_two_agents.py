"""One node, one agent: a second node agent for the same node name and namespace (a user starts
`prefect-mig agent` while the local cluster's runs, or gives two hosts one `PREFECT_MIG_NODE`)
refuses to run, so two agents never apply one GPU's desired layout at once (a campaign that ran two
saw leased slices destroyed and destroyed slices granted). A dead agent's claim does not hold its
successor back: on the same host at once, from another host after the heartbeat TTL. A GPU that a
renamed node's agent publishes under its new name stays in service when the old name lapses, and
a task container labelled with the old name is fenced like any other. Real Redis, the simulated
NVML, the local Docker engine for the containers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import docker.errors
import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.errors import NodeClaimLapsed, NodeNotClaimed, NodeTaken
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.gpu.host_lock import GpuLocks
from prefect_mig.model import Layout
from prefect_mig.node_claim import NodeClaim
from tests.agent_fixtures import run_in_thread, start_task_container

A30_TWO = "2g.12gb@0 + 2g.12gb@2"


@pytest.fixture
def two_agents(redis_client, namespace, tmp_path):
    """Two agents for node-a of one namespace, each with its own backend on the same simulated A30 and
    its own GPU lock dir (two hosts given one node name, or containers each with a /tmp of its own):
    the node claim is what keeps them apart."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as first, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as second:
        first.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        gpus = [g.uuid for g in first.gpus()]
        yield tuple(NodeAgent(b, Allocator(redis_client, namespace), node="node-a", heartbeat_ttl_s=2,
                              gpu_locks=GpuLocks(tmp_path / f"gpu-locks-{i}", gpus, what="node agent", mode="private"))
                    for i, b in enumerate((first, second)))


def _serving_in_thread(agent: NodeAgent, stop: threading.Event) -> tuple[threading.Thread, list]:
    """`_run_in_thread`, once the agent has published its node."""
    running, raised = run_in_thread(agent, stop)
    alloc, deadline = agent.allocator, time.monotonic() + 30
    while not alloc.redis.hexists(alloc.keys.nodes, agent.node):
        assert time.monotonic() < deadline, "the agent never published its node"
        time.sleep(0.1)
    return running, raised


def _take_once_lapsed(agent: NodeAgent, timeout_s: float = 60) -> None:
    """Claim the node for `agent` as soon as the claim of the agent holding it has lapsed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            agent.claim()
            return
        except NodeTaken:
            assert time.monotonic() < deadline, "the other agent's claim never lapsed"
            time.sleep(0.2)


@contextmanager
def _partition_on(redis_server, pattern: str, hold_s: float, *, replies_only: bool = False) -> Iterator[int]:
    """A port to reach `redis_server` through a network that partitions for `hold_s` at each chunk
    holding `pattern` read while it is not partitioned, then delivers what was sent meanwhile
    (network_delay.py); `replies_only`: only the server's replies are held, the commands reach Redis."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    network = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "network_delay.py"), str(port),
                                str(redis_server.port), pattern, str(hold_s), *(["replies"] if replies_only else [])],
                               stdout=subprocess.PIPE)
    try:
        assert network.stdout.readline().strip() == b"ready"
        yield port
    finally:
        network.kill()
        network.wait()


def test_a_second_agent_for_a_node_whose_agent_runs_stops_at_once_saying_which_agent_holds_it(two_agents):
    first, second = two_agents
    stop = threading.Event()
    try:
        running, first_raised = run_in_thread(first, stop)
        deadline = time.monotonic() + 30
        while first.allocator.heartbeat("node-a", ttl_s=2) == "unknown":  # the first has published
            assert time.monotonic() < deadline
            time.sleep(0.1)
        desired = "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3"
        second.allocator.set_desired(second.backend.gpus()[0].uuid, desired, kind="incremental")
        other, second_raised = run_in_thread(second, stop)
        other.join(timeout=30)
        assert not other.is_alive(), "a second agent for node-a kept running beside the first"
        (error,) = second_raised
        assert isinstance(error, NodeTaken)
        assert error.node == "node-a" and error.pid == os.getpid()
        assert "one agent per node" in str(error) and str(os.getpid()) in str(error)
        assert running.is_alive() and first_raised == []  # the first one keeps the node
    finally:
        stop.set()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_agent_started_again_after_its_predecessor_on_this_host_died_takes_the_node_at_once(two_agents):
    dead, successor = two_agents
    dead.identity["pid"] = _dead_pid()  # claimed the node, then was SIGKILLed
    dead.claim()
    successor.claim()  # no wait for the dead one's claim to lapse
    with pytest.raises(NodeTaken):
        dead.claim()  # and the node is the successor's now


def test_an_agent_of_another_host_holds_the_node_until_its_claim_lapses(two_agents):
    elsewhere, here = two_agents
    elsewhere.identity["host"] = "gpu-host-that-went-away"
    elsewhere.claim()
    with pytest.raises(NodeTaken) as refused:
        here.claim()
    assert refused.value.host == "gpu-host-that-went-away"
    time.sleep(elsewhere.heartbeat_ttl_s + 0.5)  # its agent stopped claiming
    here.claim()


def test_prefect_mig_agent_on_a_node_another_agent_serves_exits_1_and_changes_nothing(two_agents, redis_server, tmp_path):
    serving, _ = two_agents
    serving.heartbeat_ttl_s = 120  # its claim outlasts the CLI's start
    serving.claim()
    gpu = serving.backend.gpus()[0].uuid
    serving.allocator.set_desired(gpu, "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3", kind="incremental")
    env = _agent_env(redis_server, serving.allocator.keys.namespace, tmp_path)
    second = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--once", "--node", "node-a"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "already has a live agent" in second.stderr and f"pid {os.getpid()}" in second.stderr
    assert str(serving.backend.layout(0)) == A30_TWO and serving.allocator.desired(gpu) is not None


def test_a_gpu_published_under_a_new_node_name_stays_in_service_when_the_old_names_heartbeat_lapses(
    redis_client, namespace, tmp_path
):
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        alloc = Allocator(redis_client, namespace)
        NodeAgent(backend, alloc, node="gpu-host", heartbeat_ttl_s=1).publish()  # before PREFECT_MIG_NODE was set
        renamed = NodeAgent(backend, Allocator(redis_client, namespace), node="gpu-3", heartbeat_ttl_s=60)
        renamed.publish()  # the agent restarted under its new name; the old name's agent is gone
        time.sleep(1.5)
        alloc.reap()  # the old name's heartbeat lapsed
        assert renamed.tick() == "ok"
        assert [(s["node"], s["state"]) for s in alloc.status()["slices"]] == [("gpu-3", "free")] * 2
        assert alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=30)).slice.node == "gpu-3"


def test_an_agent_under_another_node_name_for_gpus_a_live_agent_serves_stops_at_once(two_agents):
    first, second = two_agents
    second.node = "gpu-3"  # the same GPUs under another name: PREFECT_MIG_NODE set for one agent only
    stop = threading.Event()
    try:
        running, first_raised = run_in_thread(first, stop)
        deadline = time.monotonic() + 30
        while first.allocator.heartbeat("node-a", ttl_s=2) == "unknown":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        other, second_raised = run_in_thread(second, stop)
        other.join(timeout=30)
        assert not other.is_alive(), "a second agent for node-a's GPU kept running under another name"
        (error,) = second_raised
        assert isinstance(error, NodeTaken) and error.serving == "node-a"
        assert "node-a" in str(error) and second.backend.gpus()[0].uuid in str(error)
        assert running.is_alive() and first_raised == []
    finally:
        stop.set()


def test_a_renamed_nodes_agent_fences_a_dead_holders_container_labelled_with_the_old_name(
    redis_client, namespace, tmp_path, docker_client, python_image, containers
):
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        alloc = Allocator(redis_client, namespace)
        NodeAgent(backend, alloc, node="gpu-host", docker_client=docker_client).publish()
        lease = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=1))
        task = start_task_container(docker_client, python_image, alloc, lease_id=lease.lease_id, fence=lease.fence,
                                    node="gpu-host", mig_uuid=lease.slice.mig_uuid)
        containers.append(task)
        renamed = NodeAgent(backend, Allocator(redis_client, namespace), node="gpu-3", docker_client=docker_client,
                            heartbeat_ttl_s=60)
        renamed.tick()  # the agent restarted under its new name while the task ran
        time.sleep(1.5)  # then the task's flow process died: its lease expired, its container runs on
        renamed.tick()
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(task.id)  # fenced, whatever node name its label carries
        states = {s["mig_uuid"]: s["state"] for s in alloc.status()["slices"]}
        assert states[lease.slice.mig_uuid] == "free"  # back in service only once it is gone


A30_FOUR = "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3"


@pytest.fixture
def slow_carver(redis_client, namespace, tmp_path):
    """node-a's agent on an A30 whose every NVML create and destroy takes 1.5 s (the real driver can
    take that long), and a second agent's view of the same GPU. Its heartbeat TTL is 3 s, so the
    re-carve to `A30_FOUR` (six such calls) outlasts it three times over."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path, change_delay_s=1.5)) as slow, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as view:
        view.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        agents = tuple(NodeAgent(b, Allocator(redis_client, namespace), node="node-a", heartbeat_ttl_s=3)
                       for b in (slow, view))
        agents[1].identity["host"] = "another-gpu-host"  # its claim waits for the first's to lapse
        yield agents


@contextmanager
def _slow_carve(carver: NodeAgent) -> Iterator[tuple[threading.Thread, list]]:
    """Publish, ask for the re-carve to `A30_FOUR` and run the agent (which begins it at once) for
    the block: (its thread, what ended it)."""
    carver.claim()
    carver.publish()
    carver.allocator.set_desired(carver.backend.gpus()[0].uuid, A30_FOUR, kind="incremental")
    stop = threading.Event()
    running, raised = run_in_thread(carver, stop)
    try:
        yield running, raised
    finally:
        stop.set()
        running.join(timeout=60)


def test_an_agent_whose_carve_outlasts_the_heartbeat_ttl_keeps_its_node_claimed_until_the_carve_is_done(slow_carver):
    carver, other = slow_carver
    with _slow_carve(carver) as (running, raised):
        deadline = time.monotonic() + 120
        while str(other.backend.layout(0)) != A30_FOUR:
            assert time.monotonic() < deadline, "the carve did not finish"
            with pytest.raises(NodeTaken):  # never free for another host's agent while it carves
                other.claim()
            time.sleep(0.2)
        assert running.is_alive() and raised == []


def test_an_agent_that_finds_its_node_taken_by_another_mid_carve_stops_carving_and_exits(slow_carver):
    carver, other = slow_carver
    with _slow_carve(carver) as (running, raised):
        deadline = time.monotonic() + 120
        while len(other.backend.instances(0)) == 2:  # until its first destroy landed; four more steps to go
            assert time.monotonic() < deadline, "the carve did not begin"
            time.sleep(0.05)
        # another agent got the node (this one's claim lapsed while its Redis link was down)
        mine, its = (json.dumps({**a.identity, "node": "node-a"}, sort_keys=True) for a in (other, carver))
        other.allocator.claim_node("node-a", mine, ttl_s=120, gpus=[other.backend.gpus()[0].uuid], replace=its)
        running.join(timeout=60)
        assert not running.is_alive(), "the agent kept running on a node another agent holds"
        (error,) = raised
        assert isinstance(error, NodeTaken) and error.host == "another-gpu-host"
        after = str(other.backend.layout(0))
        assert after != A30_FOUR, "it carved on after another agent took its node"
        time.sleep(3)
        assert str(other.backend.layout(0)) == after


def _agent_env(redis_server, namespace: str, tmp_path) -> dict:
    return {
        **os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(tmp_path), "COLUMNS": "200",
    }


def test_an_agent_once_gives_its_claim_back_so_an_agent_on_another_host_starts_at_once(two_agents, redis_server, tmp_path):
    _, elsewhere = two_agents
    elsewhere.identity["host"] = "another-gpu-host"
    once = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--once", "--node", "node-a"],
                          capture_output=True, text=True, env=_agent_env(redis_server, elsewhere.allocator.keys.namespace, tmp_path),
                          timeout=120)
    assert once.returncode == 0, once.stdout + once.stderr
    elsewhere.claim()  # no wait for the 30 s heartbeat TTL of the agent that ran once


def test_an_agent_stopped_gives_its_claim_back_and_one_that_failed_keeps_it_until_it_lapses(two_agents):
    first, elsewhere = two_agents
    elsewhere.identity["host"] = "another-gpu-host"
    stop = threading.Event()
    running, raised = _serving_in_thread(first, stop)
    with pytest.raises(NodeTaken):
        elsewhere.claim()
    stop.set()
    running.join(timeout=30)
    assert raised == []
    elsewhere.claim()  # given back on the clean stop
    elsewhere.heartbeat_ttl_s = 60
    with pytest.raises(RuntimeError), elsewhere.serving():
        raise RuntimeError("the agent crashed")  # half way through something: its claim lapses, not given back
    with pytest.raises(NodeTaken):
        first.claim()


def test_an_agent_gives_back_only_its_own_claim(two_agents):
    first, second = two_agents
    second.identity["host"] = "another-gpu-host"
    first.claim()
    first.allocator.release_node_claim("node-a", json.dumps({**second.identity, "node": "node-a"}, sort_keys=True),
                                       gpus=[first.backend.gpus()[0].uuid])  # not its claim: left alone
    with pytest.raises(NodeTaken):
        second.claim()


def test_an_agent_whose_claim_nobody_confirmed_for_a_ttl_changes_nothing_until_it_has_claimed_again(two_agents):
    agent, _ = two_agents
    gpu = agent.backend.gpus()[0].uuid
    agent.claim()
    agent.allocator.set_desired(gpu, A30_FOUR, kind="incremental")
    time.sleep(agent.heartbeat_ttl_s + 0.5)  # no renewal went through (Redis did not answer, the process froze)
    with pytest.raises(NodeClaimLapsed):
        agent.tick()
    assert str(agent.backend.layout(0)) == A30_TWO and agent.allocator.desired(gpu) is not None
    agent.claim()  # its next round claims the node again: nobody took it meanwhile
    assert agent.tick() == "applied" and str(agent.backend.layout(0)) == A30_FOUR


def test_a_publish_delayed_past_its_agents_claim_never_undoes_the_carve_of_the_agent_that_took_the_node(
    redis_server, namespace, tmp_path
):
    """Agent A's network partitions just as its publish is sent (its claim was fresh when it
    checked); its claim lapses, agent B takes the node and re-carves the GPU; then the network
    heals and A's publish lands. It must not bring back the slices B destroyed (granted, they would
    not exist) nor take B's new slice out of service."""
    import redis

    with _partition_on(redis_server, '"mig_uuid"', 6) as port:
        a_redis = redis.Redis(host="127.0.0.1", port=port, **redis_server.client_options)
        with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as first, \
                GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as second:
            first.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
            a = NodeAgent(first, Allocator(a_redis, namespace), node="node-a", heartbeat_ttl_s=3)
            b = NodeAgent(second, Allocator(redis_server.client(), namespace), node="node-a", heartbeat_ttl_s=3)
            b.identity["host"] = "another-gpu-host"  # it waits for A's claim to lapse
            alloc = b.allocator
            alloc.publish("node-a", *a.inventory(), heartbeat_ttl_s=30)  # A's first publish, before the partition
            outcome = []

            a.claim()

            def a_publishes():
                try:
                    outcome.append(a.publish())  # the partition begins as this publish is sent
                except Exception as exc:  # noqa: BLE001 - what A saw; the test looks at Redis
                    outcome.append(exc)

            publisher = threading.Thread(target=a_publishes, daemon=True)
            publisher.start()
            _take_once_lapsed(b)  # A's claim lapses: nothing it sends gets through
            with b.serving():
                alloc.set_desired(second.gpus()[0].uuid, "4g.24gb@0", kind="incremental")
                assert b.tick() == "applied"
                carved = {m.mig_uuid for m in second.instances(0)}
                publisher.join(60)  # the network heals: A's publish lands (or is refused)
                assert outcome, "A's publish never ended"
                published = {sid.decode() for sid in alloc.redis.smembers(alloc.keys.node_slices("node-a"))}
                assert published == carved, f"A's late publish left {sorted(published - carved)} that NVML no longer has"
                lease = alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=30))
                assert lease.slice.mig_uuid in carved
                alloc.release(lease.lease_id, lease.fence)


# A stale agent's late writes. An agent paused (SIGSTOP, a long GC pause) or cut off by a partition past its claim's
# TTL, while another agent took the node, still believes its node its own: its check in Python passed before the
# pause. Redis refuses each write it makes for the node once the node's claim is another agent's (atomically with
# the write), so what the agent serving the node now did stays as it left it.


def _claim_of(agent: NodeAgent) -> str:
    """The agent's claim as Redis holds it (see `NodeClaim`)."""
    return json.dumps({**agent.identity, "node": agent.node}, sort_keys=True)


def _refused(write) -> NodeNotClaimed | None:
    try:
        write()
    except NodeNotClaimed as exc:
        return exc
    return None


@pytest.fixture
def taken_over(two_agents):
    """Agent A claimed and published node-a, then stopped answering (a pause; its pid looks gone, so B need
    not wait for the claim to lapse); B took the node over and published. A's claim is long enough that A's
    own check still passes. Yields (A, B)."""
    stale, serving = two_agents
    stale.heartbeat_ttl_s = serving.heartbeat_ttl_s = 120
    stale.identity["pid"] = _dead_pid()
    stale.claim()
    stale.publish()
    serving.claim()
    serving.publish()
    yield stale, serving


def test_a_stale_agents_late_restore_leaves_the_slices_the_new_agent_withdrew_to_destroy_out_of_service(taken_over):
    stale, serving = taken_over
    alloc, gpu = serving.allocator, serving.backend.gpus()[0].uuid
    alloc.set_desired(gpu, A30_FOUR, kind="incremental")
    assert serving.begin_desired(0, gpu) == "ready"  # B withdrew the slice its re-carve destroys
    withdrawn = alloc.withheld(gpu)
    assert len(withdrawn) == 1 and set(withdrawn.values()) == {"withdrawn"}
    refused = _refused(lambda: alloc.restore(sorted(withdrawn), node="node-a", agent=_claim_of(stale)))
    assert alloc.withheld(gpu) == withdrawn, "A's late restore put back into service a slice B is destroying"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)


@pytest.mark.parametrize("write", ["withdraw", "withdraw_when_idle"])
def test_a_stale_agents_late_withdrawal_leaves_the_new_agents_slices_in_service(taken_over, write):
    stale, serving = taken_over
    alloc, gpu = serving.allocator, serving.backend.gpus()[0].uuid
    ids = sorted(m.mig_uuid for m in serving.backend.instances(0))
    refused = _refused(lambda: getattr(alloc, write)(ids, node="node-a", agent=_claim_of(stale)))
    assert alloc.withheld(gpu) == {} and alloc.slice_states(ids) == dict.fromkeys(ids, "free"), \
        f"A's late {write} took B's slices out of service"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)


def test_a_stale_agents_late_settle_leaves_a_dead_holders_slice_quarantined(taken_over):
    """A looked at its engine's containers (or looked before B's node ran the holder's container) and
    confirmed the slice settled; its confirmation lands after B took the node: the slice stays quarantined
    until B confirms it."""
    stale, serving = taken_over
    alloc = serving.allocator
    alloc.publish("node-a", *serving.inventory(), fence_settle_s=600, agent=_claim_of(serving))  # B fences
    lease = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=1))
    time.sleep(2)  # its holder died: the lease expires
    alloc.reap()
    sid = lease.slice.id
    pending = alloc.awaiting_fence("node-a")
    assert pending == {sid: (lease.lease_id, lease.slice.mig_uuid)}
    refused = _refused(lambda: alloc.settle_fenced("node-a", {sid: lease.lease_id}, agent=_claim_of(stale)))
    assert alloc.awaiting_fence("node-a") == pending and alloc.slice_states([sid]) == {sid: "quarantined"}, \
        "A's late settle took the slice out of quarantine"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)
    assert alloc.settle_fenced("node-a", {sid: lease.lease_id}, agent=_claim_of(serving)) == (1, 0)  # B's does


def test_a_stale_agents_late_heartbeat_leaves_the_node_the_new_agent_took_out_of_service_out(taken_over):
    stale, serving = taken_over
    alloc = serving.allocator
    ids = sorted(m.mig_uuid for m in serving.backend.instances(0))
    assert alloc.node_down("node-a", why="its Docker engine does not answer", agent=_claim_of(serving)) == "down"
    refused = _refused(lambda: alloc.heartbeat("node-a", ttl_s=120, agent=_claim_of(stale)))
    assert alloc.slice_states(ids) == dict.fromkeys(ids, "unavailable"), "A's late heartbeat put B's node back"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)
    assert alloc.heartbeat("node-a", ttl_s=120, agent=_claim_of(serving)) == "back"


def test_a_stale_agents_late_node_down_leaves_the_new_agents_node_in_service(taken_over):
    stale, serving = taken_over
    alloc = serving.allocator
    ids = sorted(m.mig_uuid for m in serving.backend.instances(0))
    refused = _refused(lambda: alloc.node_down("node-a", why="its Docker engine does not answer", agent=_claim_of(stale)))
    assert alloc.slice_states(ids) == dict.fromkeys(ids, "free"), "A's late node_down took B's node out of service"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)


def test_a_stale_agents_round_changes_nothing_on_the_node_another_agent_took(taken_over):
    """The agent itself passes its claim: its Python check passes (it never learnt of B), Redis refuses."""
    stale, serving = taken_over
    alloc, gpu = serving.allocator, serving.backend.gpus()[0].uuid
    ids = sorted(m.mig_uuid for m in serving.backend.instances(0))
    alloc.node_down("node-a", why="its Docker engine does not answer", agent=_claim_of(serving))
    stale.check_claim()
    with pytest.raises(NodeNotClaimed):
        stale.tick()  # its heartbeat
    assert alloc.slice_states(ids) == dict.fromkeys(ids, "unavailable")
    assert alloc.heartbeat("node-a", ttl_s=120, agent=_claim_of(serving)) == "back"
    alloc.set_desired(gpu, A30_FOUR, kind="incremental")
    with pytest.raises(NodeNotClaimed):
        stale.begin_desired(0, gpu)  # its withdrawal of the slice the desired layout dooms
    assert alloc.withheld(gpu) == {} and alloc.slice_states(ids) == dict.fromkeys(ids, "free")


def test_a_stale_agents_late_clear_leaves_the_desired_layout_the_new_agent_is_asked_to_apply(taken_over):
    stale, serving = taken_over
    alloc, gpu = serving.allocator, serving.backend.gpus()[0].uuid
    alloc.set_desired(gpu, A30_FOUR, kind="incremental")
    asked = alloc.desired(gpu)
    refused = _refused(lambda: alloc.clear_desired(gpu, outcome="applied", applied=asked, node="node-a",
                                                   agent=_claim_of(stale)))
    assert alloc.desired(gpu) == asked, "A's late clear deleted the layout B is asked to apply"
    assert isinstance(refused, NodeNotClaimed) and refused.holder == _claim_of(serving)
    assert serving.tick() == "applied" and str(serving.backend.layout(0)) == A30_FOUR
    assert alloc.desired(gpu) is None


def test_a_layout_asked_for_while_the_agent_carves_another_is_applied_next_not_lost(slow_carver):
    carver, other = slow_carver
    newer = "4g.24gb@0"
    with _slow_carve(carver) as (running, raised):
        deadline = time.monotonic() + 120
        while len(other.backend.instances(0)) == 2:  # its carve to A30_FOUR began
            assert time.monotonic() < deadline, "the carve did not begin"
            time.sleep(0.05)
        carver.allocator.set_desired(carver.backend.gpus()[0].uuid, newer, kind="incremental")  # the planner changed its mind
        while str(other.backend.layout(0)) != newer:
            assert time.monotonic() < deadline, (
                f"the layout asked for during the carve was never applied: {other.backend.layout(0)}, "
                f"desired {carver.allocator.desired(carver.backend.gpus()[0].uuid)}")
            time.sleep(0.2)
        assert running.is_alive() and raised == []


def test_an_agent_whose_write_another_agents_claim_refused_mid_round_says_so_in_one_line_and_stops(
    redis_server, namespace, tmp_path, caplog
):
    """A's first round publishes just as its network partitions; its claim lapses, B takes the node,
    the network heals and Redis refuses A's publish. A says once, without a traceback, that another
    agent holds node-a, and its loop ends with NodeTaken."""
    import logging

    import redis

    with _partition_on(redis_server, '"mig_uuid"', 6) as port, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as first, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as second:
        first.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        a_redis = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30, **redis_server.client_options)  # outlasts the partition
        a = NodeAgent(first, Allocator(a_redis, namespace), node="node-a", heartbeat_ttl_s=3)
        b = NodeAgent(second, Allocator(redis_server.client(), namespace), node="node-a", heartbeat_ttl_s=120)
        b.identity["host"] = "another-gpu-host"
        stop = threading.Event()
        with caplog.at_level(logging.INFO, logger="prefect_mig.agent"):
            running, raised = run_in_thread(a, stop)
            deadline = time.monotonic() + 60
            while not b.allocator.redis.exists(b.allocator.keys.agent("node-a")):  # A serves the node
                assert time.monotonic() < deadline, "A never claimed the node"
                time.sleep(0.05)
            _take_once_lapsed(b)  # A's claim lapses while its publish is held up
            running.join(60)
        stop.set()
        assert not running.is_alive(), "A kept serving a node B holds"
        (error,) = raised
        assert isinstance(error, NodeTaken) and error.host == "another-gpu-host"
        said = [r for r in caplog.records if r.name == "prefect_mig.agent"]
        assert [r.getMessage() for r in said if r.exc_info] == [], "a traceback for a refusal the agent expects"
        lines = [r.getMessage() for r in said]
        assert any(line.startswith("node node-a: another agent holds it now (pid ") and "another-gpu-host" in line
                   and "publish" in line for line in lines), lines


BUSY_LUA = """
local t = redis.call('TIME')
local till = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000000
while true do
  local n = redis.call('TIME')
  if tonumber(n[1]) * 1000000 + tonumber(n[2]) >= till then return 1 end
end
"""


def test_an_agent_stopped_while_redis_is_busy_still_gives_its_claim_back(fresh_redis_server, namespace, tmp_path):
    """Redis runs a long script (2.5 s) just as the agent stops: past its busy threshold it answers
    every command BUSY, which the Redis client does not retry. The claim is given back once Redis
    answers again, so an agent on another host starts at once instead of waiting out the 60 s TTL."""
    server = fresh_redis_server
    server.client().config_set("busy-reply-threshold", 200)  # ms: BUSY replies begin sooner than the default 5 s
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as first, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as second:
        first.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        impatient = server.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        stopping = NodeAgent(first, Allocator(impatient, namespace), node="node-a", heartbeat_ttl_s=60)
        elsewhere = NodeAgent(second, Allocator(server.client(), namespace), node="node-a", heartbeat_ttl_s=60)
        elsewhere.identity["host"] = "another-gpu-host"
        stop = threading.Event()
        running, raised = _serving_in_thread(stopping, stop)
        busy = threading.Thread(target=lambda: server.client().eval(BUSY_LUA, 0, 2.5), daemon=True)
        busy.start()
        time.sleep(0.3)
        stop.set()  # stopped while Redis answers BUSY
        running.join(30)
        busy.join(30)
        assert not running.is_alive() and raised == []
        elsewhere.claim()  # given back: no wait for the stopped agent's 60 s claim to lapse


def test_a_stop_signal_that_lands_while_the_claims_reply_is_on_the_way_gives_the_claim_back(
    fresh_redis_server, namespace, tmp_path
):
    """The agent's claim reached Redis and holds, but its reply is held up in the network when
    SIGTERM arrives (the signal handler raises in the middle of the call): the agent cannot know it
    won the claim, so it gives it back as it ends (a compare-and-delete: one it did not win stays),
    and an agent on another host takes the node at once instead of waiting out the 60 s TTL."""
    import redis

    server = fresh_redis_server
    direct = Allocator(server.client(), namespace)
    me = uuid.uuid4().hex  # the agent's id, sent only in the transaction that sets the claim (and in its give-back)
    with _partition_on(server, me, 2, replies_only=True) as port, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        slow = Allocator(redis.Redis(host="127.0.0.1", port=port, socket_timeout=30), namespace)
        locks = GpuLocks(tmp_path / "gpu-locks", [g.uuid for g in backend.gpus()], what="node agent", mode="private")
        agent = NodeAgent(backend, slow, node="node-a", heartbeat_ttl_s=60, gpu_locks=locks)
        agent.identity["id"] = me
        elsewhere = NodeClaim(direct, "node-a", ttl_s=60, gpus=lambda: [g.uuid for g in backend.gpus()])
        elsewhere.identity["host"] = "another-gpu-host"

        claimed = []

        def signal_once_claimed() -> None:
            deadline = time.monotonic() + 30
            while not claimed and time.monotonic() < deadline:
                claimed.extend(filter(None, [direct.redis.get(direct.keys.agent("node-a"))]))
                time.sleep(0.01)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # where the agent waits for the reply

        before = signal.signal(signal.SIGTERM, agent.terminate)
        try:
            threading.Thread(target=signal_once_claimed, daemon=True).start()
            with pytest.raises(SystemExit) as stopped, agent.serving():
                pytest.fail("the agent served although it was stopped while claiming")
        finally:
            signal.signal(signal.SIGTERM, before)
        assert stopped.value.code == 0 and claimed and me in claimed[0].decode()
        elsewhere.take()  # given back: no wait for the stopped agent's claim to lapse


def test_a_renewal_that_lands_after_the_agent_gave_its_claim_back_does_not_take_the_node_again(redis_client, namespace):
    """An agent stops while its claim's renewal is held up (reading the node's GPUs from a slow NVML,
    or in the network) past the agent's wait for it: the claim is given back, then the renewal
    lands. It must not hold the node for one more TTL: an agent on another host starts at once."""
    alloc = Allocator(redis_client, namespace)
    stopping, stalled, resume = threading.Event(), threading.Event(), threading.Event()

    def gpus() -> list[str]:
        if threading.current_thread().name == "claim:node-a" and stopping.is_set():
            stalled.set()
            resume.wait(30)
        return ["GPU-1"]

    claim = NodeClaim(alloc, "node-a", ttl_s=1.5, gpus=gpus)
    elsewhere = NodeClaim(alloc, "node-a", ttl_s=30, gpus=lambda: ["GPU-1"])
    elsewhere.identity["host"] = "another-gpu-host"
    with claim.kept():
        stopping.set()
        assert stalled.wait(10), "no renewal began"
        (renewer,) = [t for t in threading.enumerate() if t.name == "claim:node-a"]
    assert alloc.redis.get(alloc.keys.agent("node-a")) is None, "the claim was not given back"
    resume.set()  # the renewal goes on, and reaches Redis after the give-back
    renewer.join(10)
    assert not renewer.is_alive()
    elsewhere.take()  # no wait for the stopped agent's claim to lapse


def test_a_renewal_extends_only_a_claim_redis_holds_as_the_agents_own(redis_client, namespace):
    alloc = Allocator(redis_client, namespace)
    me, other = "agent-1", "agent-2"
    node_key, gpu_key = alloc.keys.agent("node-a"), alloc.keys.gpu_agent("GPU-1")
    assert alloc.claim_node("node-a", me, ttl_s=5, gpus=["GPU-1"]) is None
    assert alloc.renew_node_claim("node-a", me, ttl_s=60, gpus=["GPU-1", "GPU-2"]) is None
    assert alloc.redis.pttl(node_key) > 5000 and alloc.redis.pttl(gpu_key) > 5000
    assert alloc.redis.get(alloc.keys.gpu_agent("GPU-2")) == b"agent-1"  # a GPU the node gained is claimed with it
    assert alloc.release_node_claim("node-a", me, gpus=["GPU-1", "GPU-2"])
    assert alloc.renew_node_claim("node-a", me, ttl_s=60, gpus=["GPU-1"]) == ("node node-a", None)
    assert alloc.redis.exists(node_key, gpu_key) == 0  # given back stays given back
    assert alloc.claim_node("node-a", other, ttl_s=60, gpus=["GPU-1"]) is None
    assert alloc.renew_node_claim("node-a", me, ttl_s=60, gpus=["GPU-1"]) == ("node node-a", other)
    alloc.release_node_claim("node-a", other)  # the node's only: another agent still holds GPU-1
    assert alloc.renew_node_claim("node-a", me, ttl_s=60, gpus=["GPU-1"]) == ("node node-a", None)
    assert alloc.claim_node("node-a", me, ttl_s=60) is None
    assert alloc.renew_node_claim("node-a", me, ttl_s=60, gpus=["GPU-1"]) == ("GPU GPU-1", other)
    assert alloc.redis.get(gpu_key) == b"agent-2"
