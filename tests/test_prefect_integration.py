"""Prefect tasks on leased MIG slices: a real Prefect API (temporary server), real Redis, real Docker."""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Any

import pytest
import redis
from pydantic import BaseModel
from prefect import flow
from prefect import task as prefect_task

from prefect_mig import MigTaskRunner, task
from prefect_mig.allocator import Allocator
from prefect_mig.allocator.invariants import check_events
from prefect_mig.launchers.docker import task_containers

from .allocator_fixtures import H100_MIXED
from .prefect_fixtures import read_lease_events, read_task_run_states


def env_of_slice(i):
    import os
    import time

    time.sleep(0.3)
    return i, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_fan_out_runs_each_task_in_a_container_that_sees_only_its_slice(cluster):
    infer = task(task_runner=MigTaskRunner(profile="1g.10gb"))(env_of_slice)

    @flow
    def pipeline():
        return [f.result() for f in infer.map(range(6))]

    results = pipeline()
    slices = {s["mig_uuid"] for s in cluster.status()["slices"] if s["profile"] == "1g.10gb"}
    assert [i for i, _ in results] == list(range(6))
    assert {uuid for _, uuid in results} <= slices
    report = check_events(cluster.events())
    assert report.violations == [] and report.grants == 6 and report.live == set()


def raise_boom():
    raise RuntimeError("boom in the container")


def test_a_failing_body_fails_the_task_with_the_remote_traceback_and_retries_take_fresh_leases(cluster):
    failing = task(task_runner=MigTaskRunner(profile="3g.40gb"), retries=1, retry_delay_seconds=0)(raise_boom)

    @flow
    def pipeline():
        try:
            failing()
        except RuntimeError as exc:
            return exc
        return None

    raised = pipeline()
    assert isinstance(raised, RuntimeError) and "boom in the container" in str(raised)
    assert "raise_boom" in str(raised.__cause__)
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert len(granted) == 2 and granted[0]["fence"] != granted[1]["fence"]


def sleep_forever():
    import time

    time.sleep(120)


def test_a_timeout_kills_the_container_and_frees_the_slice(cluster):
    slow = task(task_runner=MigTaskRunner(profile="3g.40gb"), timeout_seconds=2)(sleep_forever)

    @flow
    def pipeline():
        state = slow(return_state=True)
        return state.is_failed(), state.message

    started = time.monotonic()
    failed, message = pipeline()
    assert failed and "exceeded timeout" in message
    assert time.monotonic() - started < 60  # the body sleeps 120 s; a loaded machine may take a while to start its run
    assert {s["state"] for s in cluster.status()["slices"]} == {"free"}


def test_a_waiting_task_shows_awaiting_mig_then_runs(cluster):
    from prefect_mig.allocator import SliceRequest

    holder = cluster.try_acquire(SliceRequest(profile="3g.40gb"))
    big = task(task_runner=MigTaskRunner(profile="3g.40gb"))(env_of_slice)

    @flow
    def pipeline():
        future = big.submit(1)
        deadline = time.monotonic() + 60
        while not cluster.status()["queue"] and time.monotonic() < deadline:
            time.sleep(0.1)  # a fixed pause lost the race on a loaded machine: the task had not queued yet
        cluster.release(holder.lease_id, holder.fence)
        return future.task_run_id, future.result()

    task_run_id, (_, uuid) = pipeline()
    assert uuid == holder.slice.mig_uuid
    states = read_task_run_states(task_run_id, until=lambda states: states and states[-1].name == "Completed")
    names = [s.name for s in states]
    assert "AwaitingMIG" in names
    assert names[-1] == "Completed"


def test_a_missing_image_fails_clearly_and_takes_no_lease(cluster):
    t = task(task_runner=MigTaskRunner(profile="1g.10gb", image="prefect-mig-no-such-image:1"))(env_of_slice)

    @flow
    def pipeline():
        state = t(1, return_state=True)
        return state.is_failed(), state.message

    failed, message = pipeline()
    assert failed and "no registry" in message
    assert [e for e in cluster.events() if e["type"] == "lease.granted"] == []


# an unknown profile ("5g.1gb") fails at decoration time: test_prefect_task_semantics.py
@pytest.mark.parametrize(("profile", "complaint"), [("7g.80gb", "no GPU in the inventory")])
def test_an_unknown_or_unoffered_profile_fails_clearly_and_leaves_nothing(cluster, profile, complaint):
    t = task(task_runner=MigTaskRunner(profile=profile))(env_of_slice)

    @flow
    def pipeline():
        state = t(1, return_state=True)
        return state.is_failed(), state.message

    failed, message = pipeline()
    assert failed and complaint in message
    assert cluster.status()["queue"] == []


@pytest.mark.parametrize(
    ("options", "field", "allowed"),
    [
        ({"priority": 500}, "priority", "100"),
        ({"priority": -1}, "priority", "0"),
        ({"tenant": "a b"}, "tenant", "pattern"),
        ({"lease_ttl_s": 0}, "lease_ttl_s", "1"),
        # past PREFECT_MIG_LEASE_MAX_TTL_S: the task failed at run time naming ttl_s (a new-user trial)
        ({"lease_ttl_s": 1000}, "lease_ttl_s", "900"),
        # was refused as "<= 86400", which the cluster's own maximum refuses too
        ({"lease_ttl_s": 1e9}, "lease_ttl_s", "from 1 to 900 (the cluster's maximum, PREFECT_MIG_LEASE_MAX_TTL_S)"),
        ({"wait_timeout_s": -1}, "wait_timeout_s", "from 0"),
        ({"wait_timeout_s": float("nan")}, "wait_timeout_s", "from 0"),
        ({"wait_timeout_s": 10**9}, "wait_timeout_s", "30 days"),  # was accepted, then refused at each try
        ({"wait_timeout_s": "5"}, "wait_timeout_s", "number"),
        ({"max_workers": 0}, "max_workers", ">= 1"),
    ],
)
@pytest.mark.parametrize("profile", [None, "1g.10gb"])
def test_a_bad_runner_config_is_refused_at_construction_with_or_without_a_profile(profile, options, field, allowed):
    """Found by a bad-input review: without a profile (a flow-level runner) these were accepted."""
    from prefect_mig.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        MigTaskRunner(profile, **options)
    said, (value,) = str(refused.value), options.values()
    assert refused.value.field == field and field in said and allowed in said
    assert repr(value) in said or str(value) in said


def test_a_runner_lease_ttl_is_checked_against_the_clusters_maximum_in_effect(monkeypatch):
    from prefect_mig.errors import ConfigError

    monkeypatch.setenv("PREFECT_MIG_LEASE_MAX_TTL_S", "3600")
    assert MigTaskRunner(lease_ttl_s=3600).lease_ttl_s == 3600
    with pytest.raises(ConfigError, match=r"lease_ttl_s=1000000000.0: .* from 1 to 3600 .*PREFECT_MIG_LEASE_MAX_TTL_S"):
        MigTaskRunner(lease_ttl_s=1e9)


def test_a_zero_wait_timeout_is_a_valid_runner_config_meaning_do_not_wait():
    assert MigTaskRunner(wait_timeout_s=0, max_workers=1).wait_timeout_s == 0


def test_a_flow_level_runner_sends_only_tagged_tasks_to_slices(cluster):
    @prefect_task(tags=["mig:1g.10gb", "mig-priority:7"])
    def on_gpu():
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    @prefect_task
    def on_cpu():
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    @flow(task_runner=MigTaskRunner())
    def pipeline():
        return on_gpu.submit().result(), on_cpu.submit().result()

    gpu, cpu = pipeline()
    assert gpu and gpu.startswith("MIG-") and cpu is None
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert [e["priority"] for e in granted] == ["7"]


def test_a_flow_level_runner_with_a_profile_sends_every_task_to_a_slice_of_it(cluster):
    """A new-user trial: ``@flow(task_runner=MigTaskRunner(profile="1g.10gb"))`` ran its untagged
    tasks in the flow's own process, with no slice and no word, the runner's profile unused."""

    @prefect_task
    def untagged():
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    @prefect_task(tags=["mig:3g.40gb"])
    def tagged():
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    @flow(task_runner=MigTaskRunner(profile="1g.10gb"))
    def pipeline():
        return untagged.submit().result(), untagged(), tagged.submit().result()

    submitted, called, own = pipeline()
    for uuid in (submitted, called, own):
        assert uuid and uuid.startswith("MIG-"), (submitted, called, own)
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert sorted(e["pkey"].split("/")[-1] for e in granted) == ["1g.10gb", "1g.10gb", "3g.40gb"]


def test_a_task_tagged_mig_none_runs_in_the_flows_process_under_a_runner_with_a_profile(cluster):
    """Under ``MigTaskRunner(profile=...)`` every task went to a slice, with no way to keep a light
    one (a parse, a notification) in the flow's process: ``mig:none`` does, submitted, called or
    tagged at call time, and wins over a ``mig:`` tag of the task's own."""
    from prefect import tags

    def where() -> str | None:
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    light = prefect_task(tags=["mig:none"])(where)
    heavy = prefect_task(tags=["mig:3g.40gb"])(where)
    untagged = prefect_task(where)

    @flow(task_runner=MigTaskRunner(profile="1g.10gb"))
    def pipeline():
        with tags("mig:none"):
            held_back = heavy.submit().result(), untagged()
        return light.submit().result(), light(), held_back, untagged.submit().result()

    submitted, called, held_back, on_slice = pipeline()
    host = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert (submitted, called, *held_back) == (host, host, host, host)
    assert on_slice and on_slice.startswith("MIG-")
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert [e["pkey"].split("/")[-1] for e in granted] == ["1g.10gb"]  # only the untagged submit outside


def test_mig_none_with_a_task_level_runner_is_refused_at_decoration_time_naming_the_tag():
    from prefect_mig.errors import ConfigError

    with pytest.raises(ConfigError, match="'mig:none'") as refused:
        task(task_runner=MigTaskRunner(profile="1g.10gb"), tags=["mig:none"])(cube)
    assert refused.value.field == "tags"


@pytest.mark.parametrize("how", ["call-time tags", "with_options"])
def test_mig_none_reaching_a_task_level_runner_at_run_time_fails_the_task_naming_the_tag(cluster, how):
    """The same contradiction at run time (``with tags("mig:none"):`` around the call, or
    ``.with_options(tags=[...])``) ran the task on its slice as if the tag were not there."""
    from prefect import tags

    from prefect_mig.errors import ConfigError

    sliced = task(task_runner=MigTaskRunner(profile="1g.10gb"), name="sliced")(cube)

    @flow
    def pipeline():
        if how == "with_options":
            return sliced.with_options(tags=["mig:none"])(2)
        with tags("mig:none"):
            return sliced(2)

    with pytest.raises(ConfigError, match="'mig:none'") as refused:
        pipeline()
    assert refused.value.field == "tags"
    assert [e for e in cluster.events() if e["type"] == "lease.granted"] == []
    assert cluster.status()["queue"] == [] and cluster.status()["leases"] == []


def cube(n):
    return n ** 3


def total_and_types(parts, named):
    return sum(parts) + sum(named["again"]), type(parts).__name__, type(named["again"]).__name__


def test_a_mapped_result_passed_to_another_slice_task_arrives_as_a_plain_list_in_a_python_only_image(cluster):
    """Prefect resolves the futures of a `.map` but keeps its container type, PrefectFutureList;
    the default image has no Prefect, so that type cannot be unpickled there."""
    embed = task(task_runner=MigTaskRunner(profile="1g.10gb"))(cube)
    aggregate = task(task_runner=MigTaskRunner(profile="3g.40gb"))(total_and_types)

    @flow
    def pipeline():
        parts = embed.map(range(4))
        return aggregate.submit(parts, {"again": parts}).result()

    assert pipeline() == (2 * (0 + 1 + 8 + 27), "list", "list")


def count_and_seen(batch, tag):
    from prefect.runtime import flow_run, task_run

    return len(batch), len(task_run.parameters["batch"]), len(flow_run.parameters["ids"]), tag


def test_a_task_whose_arguments_are_large_runs_and_its_run_context_still_names_them(cluster):
    """Found by a new-user trial: a batch of 50,000 ids as an argument failed the task with "exec
    /usr/bin/python3: argument list too long", as the run context (parameters included) went into
    the container's environment, where Linux caps one variable at 128 KiB."""
    counter = task(task_runner=MigTaskRunner(profile="1g.10gb"))(count_and_seen)

    @flow
    def pipeline(ids: list):
        return counter(ids, "done")

    assert pipeline(list(range(50_000))) == (50_000, 50_000, 50_000, "done")


def parameters_as_seen(blob, ids, scale=2):
    from prefect.runtime import task_run

    seen = task_run.parameters
    return type(seen["blob"]).__name__, seen["blob"] == blob, seen["ids"], seen["scale"]


@pytest.mark.parametrize("keep_warm_s", [0, 30], ids=["cold", "warm"])
def test_a_body_without_prefect_sees_its_parameters_as_the_values_it_was_called_with(cluster, keep_warm_s):
    """Found by a large-argument measurement: a body's `prefect.runtime.task_run.parameters` were
    the flow process's JSON of them, non-JSON values by their repr (8 MB of bytes became a 32 MB
    string, and three of them took seconds to encode and decode on every call)."""
    seen = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=keep_warm_s))(parameters_as_seen)

    @flow
    def pipeline():
        return seen(bytes(range(256)) * 4_000, {3, 1, 2}), seen(b"", set(), scale=5)

    assert pipeline() == (("bytes", True, {1, 2, 3}, 2), ("bytes", True, set(), 5))


def test_a_killed_flow_process_leaves_no_container_and_no_lease(redis_server, namespace, tmp_path, docker_client, python_image):
    import signal
    import subprocess
    import sys

    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout

    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        agent = NodeAgent(backend, alloc, node="node-a", docker_client=docker_client)
        agent.publish()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
            "PREFECT_MIG_REDIS_URL": redis_server.url,
            "PREFECT_MIG_NAMESPACE": namespace,
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded 2-core machine
        }
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # its own session, so that the kill takes the flow process with its children (Prefect's
        # temporary API server), as a crashed host would, and leaves no orphan behind
        proc = subprocess.Popen([sys.executable, "-m", "tests.flow_to_kill"], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        def ours():
            return task_containers(docker_client, cluster_id=alloc.cluster_id(), namespace=namespace)

        try:
            deadline = time.monotonic() + 120
            while not ours() and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
            assert ours(), "the task container never started"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        # the lease expires within its TTL (2 s); the agent's next ticks stop the orphan container (a
        # loaded 2-core machine's engine can take seconds to stop and remove it)
        deadline = time.monotonic() + 2 + 60
        while time.monotonic() < deadline:
            agent.tick()
            if not ours() and not alloc.status()["leases"]:
                break
            time.sleep(0.5)
        assert ours() == []
        assert alloc.status()["leases"] == []
        assert {s["state"] for s in alloc.status()["slices"]} == {"free"}


def test_wait_for_and_direct_calls_and_caching_behave_as_with_prefect(cluster):
    from prefect.cache_policies import INPUTS

    cached = task(task_runner=MigTaskRunner(profile="1g.10gb"), cache_policy=INPUTS, persist_result=True)(env_of_slice)
    plain = task(task_runner=MigTaskRunner(profile="1g.10gb"))(env_of_slice)

    import random

    fresh = random.randrange(10**9)  # results persist across runs: a new input, a new cache key

    @flow
    def pipeline():
        first = plain.submit(1)
        second = plain.submit(2, wait_for=[first])
        direct = plain(3)
        return first.result(), second.result(), direct, cached(fresh), cached(fresh)

    first, second, direct, c1, c2 = pipeline()
    assert [first[0], second[0], direct[0]] == [1, 2, 3]
    assert c1 == c2
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert len(granted) == 4  # the second cached call took no lease


def test_a_revoked_lease_stops_the_container_and_fails_the_task_saying_so(cluster):
    from prefect.context import FlowRunContext

    from prefect_mig.allocator import SliceRequest

    victim = task(task_runner=MigTaskRunner(profile="3g.40gb", priority=1, preemptible=True, lease_ttl_s=3))(sleep_forever)

    @flow
    def pipeline():
        future = victim.submit()
        deadline = time.monotonic() + 60
        while not cluster.status()["leases"] and time.monotonic() < deadline:
            time.sleep(0.1)
        urgent = cluster.try_acquire(SliceRequest(profile="3g.40gb", priority=9), wait=True)
        state = future.wait(60) or future.state
        return state.is_failed(), state.message, urgent.request_id, FlowRunContext.get().flow_run.id

    failed, message, urgent_id, flow_run_id = pipeline()
    assert failed and "revoked" in message
    lease = cluster.lease(urgent_id)  # the slice went to the higher priority
    cluster.release(lease.lease_id, lease.fence)
    # what an automation sees (README: notify when a preemptible lease is revoked)
    events = read_lease_events(flow_run_id, wanted=2)
    assert [e.event for e in events] == ["prefect-mig.lease.granted", "prefect-mig.lease.revoked"]
    assert events[1].payload["reason"] == "revoked" and events[1].resource.id == events[0].resource.id


def test_cancelling_the_flows_tasks_stops_their_containers_and_releases_the_leases(cluster, docker_client):
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Cancelling

    from prefect_mig.allocator import SliceRequest

    holder = cluster.try_acquire(SliceRequest(profile="3g.40gb"))  # so that one task waits
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}
    slow = task(task_runner=MigTaskRunner(profile="1g.10gb"))(sleep_forever)
    waiting = task(task_runner=MigTaskRunner(profile="3g.40gb"))(sleep_forever)

    @flow
    def pipeline():
        running, queued = slow.submit(), waiting.submit()
        deadline = time.monotonic() + 60
        while not task_containers(docker_client, **ours, running_only=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        # What a cancellation is: the API shows the run Cancelling, then the runner's SIGTERM
        # unwinds the flow and its task runner's __exit__ calls cancel_all (issue 11: cancel_all
        # alone is also every normal exit's, which must let running tasks finish).
        flow_run_id = FlowRunContext.get().flow_run.id
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the test"), force=True)
        FlowRunContext.get().task_runner.cancel_all()
        for f in (running, queued):
            f.wait(60)
        took.append(time.monotonic() - started)
        ended.extend((f.state.type.value, f.state.message) for f in (running, queued))

    took: list[float] = []  # the run ends Cancelling, which has no result to read
    ended: list[tuple[str, str]] = []
    pipeline(return_state=True)
    cluster.release(holder.lease_id, holder.fence)
    took = took[0] if took else None
    assert isinstance(took, float) and took < 60  # stopped promptly, not after the body's 120 s
    (running_type, running_why), (queued_type, queued_why) = ended
    assert (running_type, queued_type) == ("CANCELLED", "CANCELLED"), ended  # not Failed or Crashed
    assert "container on 1g.10gb" in running_why and "the wait was withdrawn" in queued_why
    assert task_containers(docker_client, **ours) == []
    assert cluster.status()["leases"] == [] and cluster.status()["queue"] == []


def test_ctrl_c_of_a_flow_stops_the_containers_of_its_per_task_runners_at_once(cluster, docker_client):
    # a new-user trial: Ctrl-C of a flow whose tasks have their own MigTaskRunner (its flow runner
    # is Prefect's thread pool) waited for every body to end before the flow stopped
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}
    slow = task(task_runner=MigTaskRunner(profile="1g.10gb"))(sleep_forever)

    @flow
    def pipeline():
        futures = [slow.submit() for _ in range(2)]
        deadline = time.monotonic() + 60
        while len(task_containers(docker_client, **ours, running_only=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ended.extend(futures)
        raise KeyboardInterrupt  # what Ctrl-C raises in the flow's main thread

    ended: list = []
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pipeline()
    assert time.monotonic() - started < 60  # not after the bodies' 120 s
    assert [f.state.type.value for f in ended] == ["CANCELLED", "CANCELLED"], [f.state for f in ended]
    assert task_containers(docker_client, **ours) == []
    assert cluster.status()["leases"] == [] and cluster.status()["queue"] == []


def test_the_body_runs_on_the_docker_engine_of_the_node_that_owns_the_slice(
    prefect_api, redis_server, namespace, monkeypatch, tmp_path, docker_client, python_image
):
    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout

    # the flow's own host has no engine; the node's agent published the engine that owns its GPU
    monkeypatch.setenv("PREFECT_MIG_DOCKER_HOST", "tcp://127.0.0.1:1")
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    with GpuBackend(SimulatedNvml("gpu-node=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        NodeAgent(backend, alloc, node="gpu-node", docker_url="unix:///var/run/docker.sock").publish()
    t = task(task_runner=MigTaskRunner(profile="4g.24gb"))(env_of_slice)

    @flow
    def pipeline():
        return t(7)

    assert pipeline()[1].startswith("MIG-")
    assert alloc.status()["leases"] == []


def test_a_task_whose_redis_went_away_fails_with_why_its_lease_ended_not_with_the_release_that_followed(
    prefect_api, fresh_redis_server, namespace, monkeypatch, docker_client, python_image
):
    """A new-user trial: `prefect-mig down` while a flow's tasks ran. Each task failed with "Redis did
    not answer while trying to release a lease": the release in the runner's `finally` failed too,
    and its error hid the one that ended the try."""
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", fresh_redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    alloc = Allocator(redis.Redis.from_url(fresh_redis_server.url), namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=3600)
    cluster_id = alloc.cluster_id()
    slow = task(task_runner=MigTaskRunner(profile="3g.40gb", lease_ttl_s=6))(sleep_forever)

    @flow
    def pipeline():
        state = slow(return_state=True)
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001
            return exc

    import threading

    got = {}
    runs = threading.Thread(target=lambda: got.update(raised=pipeline()))
    runs.start()
    deadline = time.monotonic() + 120
    while not alloc.status()["leases"]:
        assert time.monotonic() < deadline, "the task never leased its slice"
        time.sleep(0.2)
    fresh_redis_server.kill()
    runs.join(timeout=120)
    assert not runs.is_alive(), "the task did not end after its lease could not be renewed"
    said = f"{type(got['raised']).__name__}: {got['raised']}"
    assert "release a lease" not in said and "renew" in said, said
    assert task_containers(docker_client, cluster_id=cluster_id, namespace=namespace) == []


def test_a_task_whose_container_the_agent_fenced_fails_with_lease_lost_naming_why(cluster, docker_client):
    from prefect_mig.agent import NodeAgent
    from prefect_mig.errors import LeaseLost

    victim = task(task_runner=MigTaskRunner(profile="3g.40gb"))(sleep_forever)
    ours = {"cluster_id": cluster.cluster_id(), "namespace": cluster.keys.namespace}

    @flow
    def pipeline():
        future = victim.submit()
        deadline = time.monotonic() + 60
        while not task_containers(docker_client, **ours, running_only=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        (lease,) = cluster.status()["leases"]
        cluster.release(lease["lease_id"], int(lease["fence"]))  # the lease ends behind the holder's back
        fenced = NodeAgent(None, cluster, node="node-a", docker_client=docker_client).fence_containers()
        state = future.wait(60) or future.state
        return fenced, state

    fenced, state = pipeline()
    assert len(fenced) == 1
    error = state.result(raise_on_failure=False)
    assert isinstance(error, LeaseLost) and error.reason == "gone"
    assert "node agent removed the container" in str(error)


def test_a_task_waiting_on_a_lapsed_agent_says_so_and_ends_at_the_default_wait_timeout(cluster, monkeypatch, tmp_path):
    from prefect_mig.errors import WaitTimeout

    from .allocator_fixtures import H100_MIXED

    monkeypatch.setenv("PREFECT_MIG_WAIT_TIMEOUT_S", "4")  # no wait_timeout_s given: the setting applies
    monkeypatch.setenv("PREFECT_MIG_STATE_DIR", str(tmp_path))
    cluster.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=1)
    time.sleep(2)
    cluster.reap()  # node-a's agent went quiet: its slices get no grants
    stuck = task(task_runner=MigTaskRunner(profile="1g.10gb"))(env_of_slice)

    @flow
    def pipeline():
        future = stuck.submit(1)
        return future.task_run_id, future.wait(60) or future.state

    task_run_id, state = pipeline()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, WaitTimeout)
    assert "no slice within 4 s" in str(error) and "node-a's agent last heartbeated" in str(error)
    states = read_task_run_states(task_run_id, until=lambda states: states and states[-1].is_final())
    messages = [s.message or "" for s in states if s.name == "AwaitingMIG"]
    assert messages and "node-a's agent last heartbeated" in messages[0]
    assert cluster.status()["queue"] == []
    assert list(tmp_path.iterdir()) == []  # a configured Redis: no local agent or redis-server was started


def _scaler_class(keep_warm_s: int):
    runner = MigTaskRunner(profile="1g.10gb", keep_warm_s=keep_warm_s)

    class Scaler:
        unit = 10

        def __init__(self, factor: int):
            self.factor = factor

        @task(task_runner=runner)
        def scale(self, x: int, offset: int = 0):
            from prefect.runtime import task_run

            seen = task_run.parameters
            return self.factor * x + offset, type(seen.get("self")).__name__, seen.get("x"), seen.get("offset")

        @task(task_runner=runner)
        @staticmethod
        def double(x: int):
            from prefect.runtime import task_run

            return 2 * x, sorted(task_run.parameters)

        @task(task_runner=runner)
        @classmethod
        def units(cls, x: int):
            from prefect.runtime import task_run

            return cls.unit * x, sorted(task_run.parameters)

    return Scaler


@pytest.mark.parametrize("keep_warm_s", [0, 30], ids=["cold", "warm"])
def test_a_task_on_a_method_runs_on_a_slice_with_its_instance_and_sees_its_parameters(cluster, keep_warm_s):
    """A `@task` on a method: Prefect passes the instance as `self` (its ``__prefect_self__``)."""
    Scaler = _scaler_class(keep_warm_s)

    @flow
    def pipeline():
        three, five = Scaler(3), Scaler(5)
        return three.scale(2), five.scale.submit(2, offset=1).result(), Scaler.double(4), Scaler.units(3)

    assert pipeline() == ((6, "Scaler", 2, 0), (11, "Scaler", 2, 1), (8, ["x"]), (30, ["cls", "x"]))


def flow_parameters_as_seen():
    import os

    from prefect.runtime import flow_run

    seen = flow_run.parameters
    return type(seen["when"]).__name__, seen["when"], len(seen["ids"]), len(os.environ["PREFECT_MIG_RUN_CONTEXT"])


@pytest.mark.parametrize("keep_warm_s", [0, 30], ids=["cold", "warm"])
def test_a_body_sees_its_flow_runs_parameters_as_the_flow_holds_them_and_they_do_not_ride_in_its_run_context(cluster, keep_warm_s):
    """A flow run's parameters travelled as JSON in every task's run context, twice (a 400 KB list
    made each task's environment 800 KB more), and the body saw a datetime as its ISO string."""
    seen = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=keep_warm_s))(flow_parameters_as_seen)

    @flow
    def pipeline(when: datetime.datetime, ids: list[int]):
        return seen(), seen()

    when = datetime.datetime(2026, 11, 27, 6, 0, tzinfo=datetime.timezone.utc)
    first, second = pipeline(when, list(range(60_000)))
    assert first[:3] == second[:3] == ("datetime", when, 60_000)
    assert first[3] < 20_000 and second[3] < 20_000


def reads_flow_parameters_if(read: bool):
    from prefect.runtime import flow_run

    if not read:
        return "did not read them"
    errors = []
    for _ in range(2):  # each read says why
        try:
            flow_run.parameters
        except RuntimeError as exc:
            errors.append(str(exc))
    return errors


class Batch(BaseModel):
    size: int


def test_a_flow_parameter_the_image_cannot_unpickle_fails_only_a_body_that_reads_it(cluster):
    """A pydantic model as a flow parameter: the python3-only image has no pydantic to rebuild it."""
    body = task(task_runner=MigTaskRunner(profile="1g.10gb"))(reads_flow_parameters_if)

    @flow
    def pipeline(batch: Batch):
        return body(False), body(True)

    done, errors = pipeline(Batch(size=3))
    assert done == "did not read them"
    assert len(errors) == 2
    assert all("flow run's parameters cannot be unpickled in this task's image" in e and "pydantic" in e for e in errors)


def reads_flow_parameter(name: str):
    from prefect.runtime import flow_run

    try:
        return flow_run.parameters[name]
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"


@pytest.mark.parametrize("keep_warm_s", [0, 30], ids=["cold", "warm"])
def test_a_flow_parameter_that_cannot_be_pickled_fails_a_body_that_reads_it_saying_why(cluster, keep_warm_s):
    """A lock as a flow parameter cannot be pickled: the body read its repr string as if it were the
    value. Its other parameters still come through."""
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=keep_warm_s))(reads_flow_parameter)

    @flow
    def pipeline(lock: Any, size: int):
        return body("size"), body("lock")

    size, lock = pipeline(threading.Lock(), 3)
    assert size == 3
    assert lock.startswith("RuntimeError: prefect.runtime.flow_run.parameters['lock']: ")
    assert "_thread.lock" in lock and "could not be sent" in lock and "cannot pickle" in lock


def test_a_mig_tagged_task_of_a_subflow_without_a_mig_runner_warns_once_that_it_runs_on_no_slice(prefect_api):
    """A new-user trial: under a flow with `MigTaskRunner()`, a subflow (Prefect's thread pool, as
    every flow that names no runner) ran its `mig:1g.10gb` tasks in the flow's process, on no slice,
    and said nothing (on a real host such a body sees every GPU)."""
    import logging

    @prefect_task(tags=["mig:1g.10gb"])
    def gpu_step(x):
        return os.environ.get("CUDA_VISIBLE_DEVICES", "none")

    @flow
    def child():
        return gpu_step.submit(1).result(), gpu_step(2), gpu_step.map([3, 4]).result()

    @flow(task_runner=MigTaskRunner())
    def parent():
        return child()

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        assert parent() == ("none", "none", ["none", "none"])
    finally:
        logger.removeHandler(handler)
    warned = [line for line in said if "on no MIG slice" in line]
    assert len(warned) == 1, said  # once per task and flow run, not per call
    assert "'gpu_step'" in warned[0] and "mig:1g.10gb" in warned[0] and "'child'" in warned[0]
    assert "task_runner=MigTaskRunner()" in warned[0]
