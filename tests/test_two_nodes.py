"""Many nodes for real: two Docker engines, two node agents in their own processes, one Redis
(the ``two_nodes`` fixture in tests/cluster_fixtures.py)."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow

from prefect_mig import MigTaskRunner, task
from prefect_mig.allocator import SliceRequest
from prefect_mig.errors import DockerUnavailable, NoCapacity

from .agent_fixtures import start_task_container
from .cluster_fixtures import HEARTBEAT_TTL_S, SLICES_PER_NODE, wait_until


def one_g(**kw) -> SliceRequest:
    return SliceRequest(profile="1g.10gb", ttl_s=600, **kw)


@pytest.fixture
def runner_env(two_nodes, prefect_api, monkeypatch):
    """This process's runner talks to the two-node cluster's Redis and namespace."""
    for key in ("PREFECT_MIG_REDIS_URL", "PREFECT_MIG_NAMESPACE", "PREFECT_MIG_BACKEND"):
        monkeypatch.setenv(key, two_nodes.env[key])
    return two_nodes


def sleep_then_report():
    import os
    import time

    time.sleep(6)  # both tasks hold their slices at once
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_flows_tasks_spread_over_both_nodes_and_each_runs_on_its_slices_node_engine(runner_env):
    c = runner_env
    # each node has one free slice left: the second task finds the first node full
    held = [c.allocator.try_acquire(one_g(node=n)) for n in ("node-a", "node-b") for _ in range(SLICES_PER_NODE - 1)]
    since = int(time.time()) - 1
    infer = task(task_runner=MigTaskRunner(profile="1g.10gb"))(sleep_then_report)

    @flow
    def pipeline():
        return [f.result() for f in [infer.submit(), infer.submit()]]

    used = pipeline()
    node_of = {s["mig_uuid"]: s["node"] for s in c.allocator.status()["slices"]}
    assert sorted(node_of[u] for u in used) == ["node-a", "node-b"]
    for node, engine in c.engines.items():  # each engine saw exactly the task container of its own node
        created = engine.events(
            since=since, until=int(time.time()) + 1, decode=True,
            filters={"type": "container", "event": "create", "label": f"prefect-mig.namespace={c.allocator.keys.namespace}"},
        )
        seen = [(e["Actor"]["Attributes"]["prefect-mig.node"], e["Actor"]["Attributes"]["prefect-mig.mig-uuid"]) for e in created]
        assert len(seen) == 1 and seen[0][0] == node and node_of[seen[0][1]] == node, (node, seen)
    for lease in held:
        c.allocator.release(lease.lease_id, lease.fence)


def test_a_killed_agents_node_gets_no_grants_after_the_ttl_and_it_fences_ended_leases_when_back(two_nodes, python_image):
    c = two_nodes
    ended, live = c.allocator.try_acquire(one_g(node="node-b")), c.allocator.try_acquire(one_g(node="node-b"))
    doomed, kept = (
        start_task_container(c.engines["node-b"], python_image, c.allocator, lease_id=lease.lease_id, fence=lease.fence,
                             node="node-b", mig_uuid=lease.slice.mig_uuid)
        for lease in (ended, live)
    )
    killed_at = time.monotonic()
    c.kill_agent("node-b")
    wait_until(lambda: not c.alive("node-b"), timeout_s=HEARTBEAT_TTL_S + 60, what="node-b to leave service")
    assert time.monotonic() - killed_at >= HEARTBEAT_TTL_S - 1  # not before its heartbeat lapsed
    assert c.alive("node-a")
    got = [c.allocator.try_acquire(one_g()) for _ in range(SLICES_PER_NODE)]
    assert {g.slice.node for g in got} == {"node-a"}  # node-a keeps serving
    with pytest.raises(NoCapacity):  # node-b's 5 free slices are not granted
        c.allocator.try_acquire(one_g())

    c.allocator.release(ended.lease_id, ended.fence)  # its container runs on: nobody fences node-b now
    doomed.reload()
    assert doomed.status == "running"
    c.start_agent("node-b")
    wait_until(lambda: c.alive("node-b"), what="node-b's agent to come back")
    wait_until(lambda: doomed.id not in {x.id for x in c.containers("node-b")}, what="the ended lease's container to be fenced")
    kept.reload()
    assert kept.status == "running"  # a live lease's container is left alone
    wait_until(lambda: len(c.slices("node-b", "free")) == SLICES_PER_NODE - 1, what="node-b's idle slices back in service")
    assert c.allocator.try_acquire(one_g()).slice.node == "node-b"


def sleep_long():
    import time

    time.sleep(300)
    return "finished"


@pytest.mark.parametrize("keep_warm_s", [0.0, 60.0], ids=["cold", "warm"])
def test_node_bs_engine_down_fails_its_task_naming_node_and_engine_and_new_requests_go_to_node_a(
    runner_env, second_engine, keep_warm_s
):
    """Cold or warm (a call into a kept task process), the task fails with `DockerUnavailable`
    naming the node and its engine, and its lease is left to lapse: the container may still run.
    Before, a warm call surfaced the engine's death as a raw requests ConnectionError."""
    c = runner_env
    held = [c.allocator.try_acquire(one_g(node="node-a")) for _ in range(SLICES_PER_NODE)]  # node-a full
    slow = task(task_runner=MigTaskRunner(profile="1g.10gb", wait_timeout_s=120, keep_warm_s=keep_warm_s))(sleep_long)

    @flow
    def pipeline():
        try:
            return slow()
        except Exception as exc:  # noqa: BLE001 - the test looks at what the task raised
            return exc

    outcome: list = []
    flow_thread = threading.Thread(target=lambda: outcome.append(pipeline()), daemon=True)
    flow_thread.start()
    wait_until(lambda: c.containers("node-b", running_only=True), timeout_s=180, what="the task container on node-b's engine")
    second_engine.kill()  # node-b's engine crashes while its task runs
    flow_thread.join(timeout=180)
    assert outcome, "the task on node-b did not end after its engine crashed"
    err = outcome[0]
    assert isinstance(err, DockerUnavailable), repr(err)
    assert "node-b" in str(err) and second_engine.url in str(err)
    assert err.unconfirmed and "left to lapse, not released" in str(err)

    wait_until(lambda: not c.alive("node-b"), timeout_s=30, what="node-b's agent to take node-b out of service")
    lost = [e for e in c.allocator.events() if e["type"] == "node.lost" and e["node"] == "node-b"]
    assert "Docker engine" in lost[-1]["why"] and second_engine.url in lost[-1]["why"]
    c.allocator.release(held[0].lease_id, held[0].fence)
    assert c.allocator.try_acquire(one_g()).slice.node == "node-a"  # new requests go to node-a
    with pytest.raises(NoCapacity):
        c.allocator.try_acquire(one_g())

    second_engine.restart()
    wait_until(lambda: c.alive("node-b"), what="node-b back once its engine answers")
    wait_until(lambda: not c.containers("node-b"), what="the crashed task's container to be fenced by node-b's agent")
    for lease in held[1:]:
        c.allocator.release(lease.lease_id, lease.fence)


def test_a_flow_run_container_whose_engine_dies_ends_the_workers_wait_with_a_typed_error(second_engine, python_image):
    """The mig-docker worker's wait on a flow run's container gives up, naming the engine, once the
    engine has refused connections for `DockerLauncher.ENGINE_GONE_S`, instead of retrying forever;
    its cleanup does not fail on the dead engine, and reports the container's removal unconfirmed,
    so the worker leaves the lease to lapse instead of releasing it while the container may run."""
    from prefect_mig.integrations.prefect.worker import _wait_container
    from prefect_mig.launchers.docker import remove_container

    client = second_engine.client()
    container = client.containers.run(python_image, ["python3", "-c", "import time; time.sleep(600)"],
                                      detach=True, network_disabled=True)
    outcome: list = []

    def wait() -> None:
        try:
            outcome.append(_wait_container(container, threading.Event(), threading.Event(), second_engine.url))
        except Exception as exc:  # noqa: BLE001 - the test looks at what the wait raised
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        time.sleep(2)
        second_engine.kill()
        waiter.join(timeout=90)
        assert outcome, "the wait did not end after the engine died"
        assert isinstance(outcome[0], DockerUnavailable), outcome[0]
        assert f"the Docker engine at {second_engine.url} stopped answering" in str(outcome[0]) and outcome[0].unconfirmed
        assert remove_container(container) is False  # the worker's cleanup: no error, and unconfirmed
    finally:
        second_engine.restart()
        try:
            client.containers.get(container.id).remove(force=True)
        except Exception:  # noqa: BLE001 - the restarted engine may have dropped it already
            pass


def test_killing_a_flow_runs_container_finds_it_on_its_nodes_engine_behind_a_unix_socket(runner_env, python_image):
    """Prefect kills a flow run's infrastructure by its ``infrastructure_pid`` (a pending run that is
    cancelled, `MigDockerWorker.kill_infrastructure`). node-b's engine listens on a unix socket of
    its own, as a rootless or a second engine does: the pid must lead back to that engine, not to
    the machine's, or the container runs on, holding its slice, while the run is marked Cancelled."""
    import anyio

    from prefect_mig.allocator import Lease
    from prefect_mig.integrations.prefect.worker import (
        MigDockerJobConfiguration, MigDockerWorker, _infrastructure_pid, _start_container,
    )
    from prefect_mig.launchers.docker import LABEL_PREFIX, cluster_labels

    c = runner_env
    got = c.allocator.try_acquire(one_g(node="node-b"))
    lease = Lease(c.allocator, got).start_renewing()
    configuration = MigDockerJobConfiguration(profile="1g.10gb", image=python_image, network="none")
    runner = configuration.runner()
    launcher = runner._launcher(c.allocator.node_docker_url("node-b"))
    labels = {LABEL_PREFIX + k: str(v) for k, v in {
        **cluster_labels(cluster_id=c.allocator.cluster_id(), namespace=c.allocator.keys.namespace, node="node-b"),
        "mig-uuid": got.slice.mig_uuid, "lease-id": got.lease_id, "fence": got.fence,
    }.items()}
    container = _start_container(launcher, "python3 -c 'import time; time.sleep(600)'", {}, labels, got.slice.mig_uuid,
                                 "none", None, lease, threading.Event())
    try:
        pid = _infrastructure_pid(launcher, container)
        worker = MigDockerWorker(work_pool_name=f"kill-{c.allocator.keys.namespace}")
        anyio.run(lambda: worker.kill_infrastructure(pid, configuration, grace_seconds=1))
        assert container.id not in {x.id for x in c.containers("node-b")}, "the flow run's container runs on"
        assert got.lease_id not in {row["lease_id"] for row in c.allocator.status()["leases"]}
    finally:
        lease.abandon()
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - removed by the kill
            pass
        c.allocator.release(got.lease_id, got.fence)
