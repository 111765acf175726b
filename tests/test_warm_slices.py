"""MigTaskRunner(keep_warm_s=...): tasks of one flow run reuse a warm task process on their slice;
warmth never blocks anyone else. Real Prefect API, Redis and Docker."""

from __future__ import annotations

import time

import pytest
from prefect import flow
from prefect import task as prefect_task

from prefect_mig import MigTaskRunner
from prefect_mig.allocator import SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import ConfigError
from prefect_mig.launchers.docker import task_containers

CALLS = 0


def count_calls(i=0):
    """How many calls this process ran, in which container, for which task run and try."""
    import os
    import socket

    global CALLS
    CALLS += 1
    return CALLS, socket.gethostname(), os.environ["PREFECT_MIG_TASK_RUN_ID"], os.environ["PREFECT_MIG_RUN_COUNT"]


def exit_hard():
    import os

    os._exit(5)


def fail_on_first_try():
    """Fails its first try (after counting it); a retry reports its process's count and host."""
    import os
    import socket

    global CALLS
    CALLS += 1
    if os.environ["PREFECT_MIG_RUN_COUNT"] == "1":
        raise RuntimeError(f"first try fails (call {CALLS} in {socket.gethostname()})")
    return CALLS, socket.gethostname()


def _grants(cluster) -> int:
    return sum(1 for e in cluster.events() if e["type"] == "lease.granted")


def _warm_runner(**options) -> MigTaskRunner:
    return MigTaskRunner(keep_warm_s=options.pop("keep_warm_s", 60), **options)


count = prefect_task(tags=["mig:1g.10gb"])(count_calls)


def test_tasks_of_one_flow_run_run_in_one_warm_process_with_their_own_run_ids(cluster):
    @flow(task_runner=_warm_runner())
    def pipeline():
        return [count.submit(i).result() for i in range(3)]

    results = pipeline()
    assert [n for n, _, _, _ in results] == [1, 2, 3]  # module globals persisted
    assert len({host for _, host, _, _ in results}) == 1  # one container
    assert len({run_id for _, _, run_id, _ in results}) == 3  # each call saw its own task run
    assert {run_count for _, _, _, run_count in results} == {"1"}
    assert _grants(cluster) == 1
    assert check_events(cluster.events()).violations == []


def test_a_new_flow_run_never_reuses_the_last_runs_process(cluster):
    @flow(task_runner=_warm_runner())
    def pipeline():
        return count.submit().result()

    first, second = pipeline(), pipeline()
    assert first[0] == 1 and second[0] == 1
    assert first[1] != second[1]


def test_share_warm_tenant_lets_the_next_flow_run_of_the_tenant_reuse_the_process(cluster):
    from prefect_mig.launchers.warm_pool import POOL

    @flow(task_runner=_warm_runner(share_warm="tenant", tenant="vision"))
    def pipeline():
        return count.submit().result()

    try:
        first, second = pipeline(), pipeline()
    finally:
        POOL.close()
    assert (first[0], second[0]) == (1, 2) and first[1] == second[1]


def slice_of_this_call():
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"]


def _flow_runs_before_and_after_a_move(cluster, redis_server, other_namespace: str, move) -> None:
    """Two flow runs of one warm runner (share_warm='tenant'), `move(other_namespace)` between
    them: the second must run on the other cluster, under a lease of its own."""
    import redis

    from prefect_mig.allocator import Allocator
    from prefect_mig.launchers.warm_pool import POOL

    from .allocator_fixtures import H100_MIXED

    other = Allocator(redis.Redis.from_url(redis_server.url), other_namespace)
    other.publish_fleet("node-b=1xH100-80GB", layouts={"node-b": [H100_MIXED]})
    on_slice = prefect_task(tags=["mig:1g.10gb"])(slice_of_this_call)

    @flow(task_runner=_warm_runner(share_warm="tenant", tenant="vision"))
    def pipeline():
        return on_slice.submit().result()

    try:
        first = pipeline()
        move(other_namespace)
        second = pipeline()
    finally:
        POOL.close()
    assert first in {s["mig_uuid"] for s in cluster.status()["slices"]}
    assert second in {s["mig_uuid"] for s in other.status()["slices"]}
    assert other.status()["leases"] == []
    assert [e["type"] for e in other.events() if e["type"] == "lease.granted"] == ["lease.granted"]


def test_a_warm_process_of_one_cluster_never_serves_a_flow_run_of_another(cluster, redis_server, monkeypatch, namespace):
    """Found by a test audit: with no `cluster=` the runner's settings come from the environment,
    and a process that moved to another namespace (or Redis) between flow runs was handed the first
    cluster's warm slot: its task ran on a slice no lease of its own cluster covered."""
    _flow_runs_before_and_after_a_move(
        cluster, redis_server, f"{namespace}-other", lambda other: monkeypatch.setenv("PREFECT_MIG_NAMESPACE", other),
    )


def test_a_warm_process_whose_dotenv_moved_it_to_another_cluster_never_serves_it(
    cluster, redis_server, monkeypatch, namespace, tmp_path,
):
    """The settings also read PREFECT_MIG_* from a `.env` file in the working directory: a flow
    process whose `.env` named another namespace for its next flow run was handed the first
    cluster's warm slot (the key saw only the environment)."""
    monkeypatch.delenv("PREFECT_MIG_NAMESPACE")
    monkeypatch.chdir(tmp_path)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# the first cluster\nPREFECT_MIG_NAMESPACE={namespace}\n")
    _flow_runs_before_and_after_a_move(
        cluster, redis_server, f"{namespace}-dotenv",
        lambda other: dotenv.write_text(f"# the second cluster\nPREFECT_MIG_NAMESPACE={other}\n"),
    )


def test_after_a_crash_the_next_task_gets_a_fresh_process(cluster):
    crash = prefect_task(tags=["mig:1g.10gb"])(exit_hard)

    @flow(task_runner=_warm_runner())
    def pipeline():
        before = count.submit().result()
        crash.submit().wait()
        after = count.submit().result()
        return before, after

    before, after = pipeline()
    assert after[0] == 1 and after[1] != before[1]


def sleep_long():
    import time

    time.sleep(120)


def test_after_a_timeout_the_next_task_gets_a_fresh_process(cluster):
    slow = prefect_task(tags=["mig:1g.10gb"], timeout_seconds=3)(sleep_long)

    @flow(task_runner=_warm_runner())
    def pipeline():
        before = count.submit().result()
        slow.submit().wait(90)
        after = count.submit().result()
        return before, after

    before, after = pipeline()
    assert after[0] == 1 and after[1] != before[1]


@pytest.mark.parametrize("timeout_s", [0.2, 0.25, 0.3, 0.33, 0.36, 0.4, 0.45, 0.5, 0.55, 0.65])
def test_a_timeout_that_lands_while_the_warm_process_starts_leaves_no_container_or_lease(cluster, docker_client, timeout_s):
    """A sync task's timeout is raised into its thread wherever it is: with these timeouts, while
    its lease is taken or its warm container is started and adopted (well under a second here).
    The container must still be stopped and the lease released when the task ends, not left for
    the agent's fencing. The window this guards (a started container not yet adopted as a slot) is
    a few milliseconds wide: without the fix this failed in 2 of 6 runs, not always."""
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}
    quick = prefect_task(tags=["mig:1g.10gb"], timeout_seconds=timeout_s)(count_calls)

    @flow(task_runner=_warm_runner(keep_warm_s=600))
    def pipeline():
        future = quick.submit()
        future.wait(90)
        return future.state.type.value

    assert pipeline() in ("FAILED", "COMPLETED")  # timed out somewhere on the way, or just made it
    assert task_containers(docker_client, **ours) == [], "the warm container started as the timeout landed is left"
    assert cluster.status()["leases"] == []


def test_a_retry_gets_a_fresh_container(cluster):
    flaky = prefect_task(tags=["mig:1g.10gb"], retries=1, retry_delay_seconds=0)(fail_on_first_try)

    @flow(task_runner=_warm_runner())
    def pipeline():
        warmed = count.submit().result()
        return warmed, flaky.submit().result()

    warmed, retried = pipeline()
    assert retried[0] == 1 and retried[1] != warmed[1]  # the retry's process saw no earlier call
    failed_try = [e for e in cluster.events() if e["type"] == "lease.reused"]
    assert len(failed_try) == 1  # the first try ran in the warm process, the retry did not


def test_a_map_over_three_slices_reuses_warm_processes(cluster):
    @flow(task_runner=_warm_runner())
    def pipeline():
        return [f.result() for f in count.map(range(9))]

    results = pipeline()
    assert len(results) == 9
    assert _grants(cluster) < 9
    assert max(n for n, _, _, _ in results) > 1
    assert check_events(cluster.events()).violations == []


def test_a_warm_slice_is_handed_over_at_once_to_a_request_that_waits_for_it(cluster, docker_client):
    others = [cluster.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(2)]  # one 1g left
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}

    @flow(task_runner=_warm_runner(keep_warm_s=600))
    def pipeline():
        count.submit().result()  # its process stays warm on the last 1g
        assert len(task_containers(docker_client, **ours)) == 1
        asked = time.monotonic()
        queued = cluster.try_acquire(SliceRequest(profile="1g.10gb", priority=0, holder="another run"), wait=True)
        got = cluster.wait_for_grant(queued.request_id, 60)
        took = time.monotonic() - asked
        gone = task_containers(docker_client, **ours) == []
        cluster.release(got.lease_id, got.fence)
        return took, gone

    took, gone = pipeline()
    for held in others:
        cluster.release(held.lease_id, held.fence)
    assert took < 30  # handed over when asked, not after keep_warm_s (600 s)
    assert gone  # its container was stopped before the slice was granted again
    assert check_events(cluster.events()).violations == []


@pytest.mark.parametrize("fails", [False, True], ids=["completed", "failed"])
def test_the_per_task_forms_idle_warm_slot_ends_with_its_flow_run(cluster, docker_client, fails):
    from prefect_mig import task

    body = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=600))(count_calls)
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}
    seen: dict = {}

    @flow
    def pipeline():
        seen["calls"] = [body.submit().result(), body()]  # a submit, then a direct call
        seen["containers"] = len(task_containers(docker_client, **ours))
        if fails:
            raise ValueError("the flow fails after its tasks")

    if fails:
        with pytest.raises(ValueError):
            pipeline()
    else:
        pipeline()
    assert [n for n, _, _, _ in seen["calls"]] == [1, 2] and seen["containers"] == 1  # it was warm
    # once the flow returns: stopped and released, not after keep_warm_s (600 s)
    assert task_containers(docker_client, **ours) == []
    assert cluster.status()["leases"] == []


def test_a_retried_flow_run_keeps_warm_slots_again_in_its_next_attempt(cluster):
    from prefect.runtime import flow_run

    @flow(task_runner=_warm_runner(), retries=1, retry_delay_seconds=0)
    def pipeline():
        first = count.submit().result()
        if flow_run.run_count == 1:
            raise RuntimeError("the first attempt fails after a warm task")
        return first, count.submit().result()

    first, second = pipeline()  # the retry keeps the flow run's id, whose first attempt ended
    assert (first[0], second[0]) == (1, 2) and first[1] == second[1]


def test_an_idle_warm_slot_is_stopped_and_released_once_keep_warm_s_passes(cluster, docker_client):
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}

    @flow(task_runner=_warm_runner(keep_warm_s=10, share_warm="tenant"))  # "tenant": it outlives the flow run
    def pipeline():
        return count.submit().result()

    pipeline()
    assert len(task_containers(docker_client, **ours)) == 1 and len(cluster.status()["leases"]) == 1
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (task_containers(docker_client, **ours) or cluster.status()["leases"]):
        time.sleep(0.5)
    assert task_containers(docker_client, **ours) == [] and cluster.status()["leases"] == []


@pytest.mark.parametrize(
    ("options", "field"),
    [({"keep_warm_s": -1}, "keep_warm_s"), ({"keep_warm_s": "long"}, "keep_warm_s"), ({"share_warm": "everyone"}, "share_warm")],
)
def test_bad_warm_options_fail_when_the_runner_is_made_naming_the_field(options, field):
    with pytest.raises(ConfigError) as caught:
        MigTaskRunner(**options)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_a_warm_process_that_died_while_idle_is_not_handed_the_next_task(cluster, docker_client):
    """An idle warm container can end while it waits for the next call: the engine restarted
    (which stops every container), the kernel's OOM killer, an operator's `docker kill`. Its lease
    is still held and renewed, so the pool kept it; the next task of the flow run was handed the
    dead process and failed without its body running ("the task container was removed while it
    ran"). It must get a fresh process instead, and the dead container must not be left behind."""
    from prefect_mig.launchers.warm_pool import POOL

    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}

    @flow(task_runner=_warm_runner(keep_warm_s=600))
    def pipeline():
        before = count.submit().result()
        (slot,) = POOL.idle()
        dead = docker_client.containers.get(slot.container.container.id)
        dead.kill()  # as an engine restart, or the OOM killer, ends it
        dead.wait(timeout=60)
        after = count.submit()
        after.wait(120)
        return before, after.state, dead.id

    before, after, dead_id = pipeline()
    assert after.is_completed(), f"the next task was handed the dead process: {after.message}"
    value = after.result()
    assert value[0] == 1 and value[1] != before[1]  # a fresh process
    assert dead_id not in {c.id for c in task_containers(docker_client, **ours)}  # not left behind
    assert cluster.status()["leases"] == []
    assert check_events(cluster.events()).violations == []
