"""Prefect events for automations, read back from the session's real Prefect API."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time

from prefect import flow

from prefect_mig import MigTaskRunner, task

from .prefect_fixtures import read_events, read_lease_events


def where_am_i():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_a_task_on_a_slice_emits_granted_then_released_about_the_slice_with_its_runs_and_tenant(cluster):
    run_on_slice = task(task_runner=MigTaskRunner(profile="1g.10gb", tenant="team-ev"))(where_am_i)

    @flow
    def pipeline():
        from prefect.context import FlowRunContext

        return FlowRunContext.get().flow_run.id, run_on_slice()

    flow_run_id, mig_uuid = pipeline()
    events = read_lease_events(flow_run_id, wanted=2)
    assert [e.event for e in events] == ["prefect-mig.lease.granted", "prefect-mig.lease.released"]
    slice_ = next(s for s in cluster.status()["slices"] if s["mig_uuid"] == mig_uuid)
    expected = f"prefect-mig.slice.{slice_['node']}/{slice_['gpu_index']}/{slice_['profile']}@{slice_['start']}"
    for e in events:
        assert e.resource.id == expected
        assert e.resource["prefect-mig.mig-uuid"] == mig_uuid
        roles = {r.role: r.id for r in e.related}
        assert roles["tenant"] == "prefect-mig.tenant.team-ev"
        assert roles["flow-run"] == f"prefect.flow-run.{flow_run_id}"
        assert roles["task-run"].startswith("prefect.task-run.")
        assert "fence" not in str(e.payload) and not any("fence" in k for k in e.resource.keys())
    assert events[1].payload["ran_s"] > 0


def test_the_agent_emits_layout_applied_about_the_gpu(prefect_api, alloc, namespace, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.integrations.prefect.events import emit_cluster_event
    from prefect_mig.model import Layout

    node = f"a{namespace}"  # a GPU UUID of this test only (it follows from the fleet): the API is the session's
    nvml = SimulatedNvml(f"{node}=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        agent = NodeAgent(backend, alloc, node=node, on_event=emit_cluster_event)
        agent.publish()
        gpu = alloc.gpus()[0]["uuid"]
        alloc.set_desired(gpu, "2g.12gb@0 + 2g.12gb@2", kind="incremental")
        assert agent.tick() == "applied"
    filt = EventFilter(
        event=EventNameFilter(prefix=["prefect-mig.layout."]),
        resource=EventResourceFilter(id=[f"prefect-mig.gpu.{gpu}"]),
    )
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while not (events := list(client.read_events(filter=filt, limit=10).events)) and time.monotonic() < deadline:
            time.sleep(1)
    assert [e.event for e in events] == ["prefect-mig.layout.applied"]
    assert events[0].payload["node"] == node


def where_is_item(i):
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_a_flow_run_that_used_slices_gets_a_table_artifact_and_a_summary(cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter as ArtifactFilter
    from prefect.client.schemas.filters import ArtifactCollectionFilterKey as ArtifactFilterKey

    from prefect_mig.integrations.prefect.artifacts import artifact_key, summary_key

    run_on_slice = task(task_runner=MigTaskRunner(profile="1g.10gb"))(where_is_item)

    @flow
    def pipeline():
        from prefect.context import FlowRunContext

        return FlowRunContext.get().flow_run.id, [f.result() for f in run_on_slice.map(range(3))]

    flow_run_id, devices = pipeline()
    with get_client(sync_client=True) as client:
        table = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(flow_run_id)])))
        summary = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key(flow_run_id)])))
    assert len(table) == 1 and table[0].type == "table" and table[0].flow_run_id == flow_run_id
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert len(rows) == 3
    by_uuid = {s["mig_uuid"]: s for s in cluster.status()["slices"]}
    assert sorted((r["node"], r["gpu"], r["slice"]) for r in rows) == sorted(
        (by_uuid[d]["node"], by_uuid[d]["gpu_index"], f"{by_uuid[d]['profile']}@{by_uuid[d]['start']}") for d in devices
    )
    assert all(r["outcome"] == "released" and r["ran_s"] > 0 and r["fence"] > 0 and r["task"] for r in rows)
    assert summary[0].type == "markdown" and "3 task(s)" in summary[0].data


def test_a_running_flow_runs_table_artifact_shows_its_ended_tasks_before_the_run_ends(cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter as ArtifactFilter
    from prefect.client.schemas.filters import ArtifactCollectionFilterKey as ArtifactFilterKey

    from prefect_mig.integrations.prefect.artifacts import artifact_key

    run_on_slice = task(task_runner=MigTaskRunner(profile="1g.10gb"))(where_is_item)

    @flow
    def pipeline():
        from prefect.context import FlowRunContext

        run_on_slice(0)
        key = artifact_key(FlowRunContext.get().flow_run.id)
        deadline = time.monotonic() + 60  # written in the background, within seconds
        with get_client(sync_client=True) as client:
            while True:
                found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                if found or time.monotonic() > deadline:
                    return found
                time.sleep(0.5)

    found = pipeline()
    assert len(found) == 1
    rows = json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data
    assert len(rows) == 1 and rows[0]["outcome"] == "released"


def test_an_async_flow_run_that_used_slices_gets_its_artifacts_too(cluster):
    """An async task on a slice records its artifact from the runner's thread, where Prefect's
    dispatching helpers would otherwise hand back a coroutine nobody awaits (no artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter as ArtifactFilter
    from prefect.client.schemas.filters import ArtifactCollectionFilterKey as ArtifactFilterKey

    from prefect_mig.integrations.prefect.artifacts import artifact_key, summary_key

    async def double(x):
        return 2 * x

    on_slice = task(task_runner=MigTaskRunner(profile="1g.10gb"))(double)

    @flow
    async def pipeline():
        from prefect.context import FlowRunContext

        return FlowRunContext.get().flow_run.id, await on_slice(21)

    flow_run_id, value = asyncio.run(pipeline())
    assert value == 42
    with get_client(sync_client=True) as client:
        table = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(flow_run_id)])))
        summary = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key(flow_run_id)])))
    assert len(table) == 1 and len(summary) == 1 and "1 task(s)" in summary[0].data


def test_the_sweeping_agent_emits_lease_expired_once_and_agent_stale_for_a_silent_node(prefect_api, alloc, clock, namespace, tmp_path):
    from prefect_mig.agent import NodeAgent
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.allocator.health import sweep_announced
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.integrations.prefect.events import emit_cluster_event
    from prefect_mig.model import Layout

    here, silent = f"a{namespace}", f"b{namespace}"  # names of this test only: the API is the session's
    alloc.publish_fleet(f"{silent}=1xA30-24GB", layouts={silent: ["4g.24gb@0"]}, heartbeat_ttl_s=10)
    with GpuBackend(SimulatedNvml(f"{here}=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        agent = NodeAgent(backend, alloc, node=here, heartbeat_ttl_s=30, on_event=emit_cluster_event)
        agent.publish()
        lease = alloc.try_acquire(SliceRequest(profile="4g.24gb", node=here, ttl_s=5, tenant="team-exp", holder="f-1/t-1"))
        clock.advance(12)

        @flow
        def sweeping_flow():  # a sweeper inside a flow run, as the mig-repartition flow is: the
            return agent.tick()  # expired lease's flow run is its holder's, not this one

        sweeping_flow()  # expires the lease, takes node `silent` out of service
        NodeAgent(backend, alloc, node=here, on_event=emit_cluster_event).reap()  # a second sweeper: nothing left
        clock.advance(40)
        for kind, fields in sweep_announced(alloc):  # as `repartition serve` does: `here` went silent
            emit_cluster_event(kind, fields)
        assert agent.tick() in ("ok", "back", "published")  # `here` heartbeats again
    s = lease.slice
    expired = read_events("prefect-mig.lease.", 1, resources=[f"prefect-mig.slice.{here}/{s.gpu_index}/{s.profile}@{s.start}"])
    nodes = read_events("prefect-mig.agent.", 3, resources=[f"prefect-mig.node.{here}", f"prefect-mig.node.{silent}"])
    assert [e.event for e in expired] == ["prefect-mig.lease.expired"]
    roles = {r.role: r.id for r in expired[0].related}
    assert roles == {"tenant": "prefect-mig.tenant.team-exp", "task-run": "prefect.task-run.t-1", "flow-run": "prefect.flow-run.f-1"}
    assert expired[0].resource["prefect-mig.lease-id"] == lease.lease_id and expired[0].payload["held_s"] == 12.0
    assert [(e.event, e.resource.id) for e in nodes] == [
        ("prefect-mig.agent.stale", f"prefect-mig.node.{silent}"),
        ("prefect-mig.agent.stale", f"prefect-mig.node.{here}"),
        ("prefect-mig.agent.recovered", f"prefect-mig.node.{here}"),
    ]
    assert nodes[0].payload["heartbeat_age_s"] >= 12 and nodes[1].payload["heartbeat_age_s"] >= 40


def test_the_repartition_trigger_wakes_when_a_flow_run_ends(prefect_api, alloc):
    import threading

    from prefect_mig.integrations.prefect.events import watch_flow_run_ends
    from prefect_mig.repartition.trigger import Trigger

    @flow
    def a_pipeline():
        return 1

    trigger = Trigger(alloc, debounce_s=0)
    stop = threading.Event()
    watch_flow_run_ends(trigger.poke, stop)
    try:
        why = None
        deadline = time.monotonic() + 120
        # until the subscriber is connected; the API is the session's, so other tests' flow runs
        # (a cancelled one) may wake it too: this one's Completed must
        while why != "prefect.flow-run.Completed" and time.monotonic() < deadline:
            assert a_pipeline() == 1
            why = trigger.wait(5)
    finally:
        stop.set()
    assert why == "prefect.flow-run.Completed"


def test_a_task_that_ends_after_its_flow_runs_cancellation_began_is_in_the_table_artifact_at_once(prefect_api):
    """A new-user trial cancelled a served flow run whose two tasks held slices: the cancellation fires
    the run's end hook (cancel_all) *before* the tasks stop, so the second task's row was left to
    the background writer, which lost the race with the process's exit: the table had one task of
    two and the exit logged two tracebacks ("can't register atexit after shutdown"). Written at
    once instead, its write still failed: the context it ran in held the flow engine's client, closed
    by then ("The client cannot be started again after closing")."""
    from types import SimpleNamespace

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter as ArtifactFilter
    from prefect.client.schemas.filters import ArtifactCollectionFilterKey as ArtifactFilterKey
    from prefect.context import SyncClientContext

    from prefect_mig.integrations.prefect.artifacts import artifact_key, record_task_slice

    def ended_lease(start):
        return SimpleNamespace(fence=7 + start, info=SimpleNamespace(waited_ms=0),
                               slice=SimpleNamespace(profile="1g.10gb", start=start, node="node-a", gpu_index=0))

    def rows_of(client, key):
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        data = found[0].data if found else "[]"
        return [r["task"] for r in (json.loads(data) if isinstance(data, str) else data)]

    @flow
    def pipeline():
        from prefect.context import FlowRunContext

        flow_ctx = FlowRunContext.get()
        run_id, key = flow_ctx.flow_run.id, artifact_key(flow_ctx.flow_run.id)
        with get_client(sync_client=True) as client:
            def first_task():
                SyncClientContext.__var__.set(None)  # a client of its own, as the flow engine's is
                with SyncClientContext():  # closed, as the flow engine's is before the last tasks stop
                    record_task_slice(SimpleNamespace(task_run=SimpleNamespace(name="first-1", flow_run_id=run_id)),
                                      ended_lease(0), outcome="released", ran_s=1.0)
                    deadline = time.monotonic() + 60
                    while not rows_of(client, key) and time.monotonic() < deadline:
                        time.sleep(0.05)  # the background writer wrote it, and now waits its 2 s

            contextvars.copy_context().run(first_task)
            flow_ctx.task_runner.cancel_all()  # what a cancellation does first; the tasks stop after it
            record_task_slice(SimpleNamespace(task_run=SimpleNamespace(name="second-2", flow_run_id=run_id)),
                              ended_lease(1), outcome="released", ran_s=1.0)
            return rows_of(client, key)

    assert sorted(pipeline()) == ["first-1", "second-2"]


LATE_TASK_SCRIPT = r'''
import contextvars, threading, time
from types import SimpleNamespace

from prefect import flow
from prefect.context import FlowRunContext

from prefect_mig.integrations.prefect.artifacts import record_task_slice

lease = SimpleNamespace(fence=7, info=SimpleNamespace(waited_ms=0),
                        slice=SimpleNamespace(profile="1g.10gb", start=0, node="node-a", gpu_index=0))


@flow
def pipeline():
    flow_ctx = FlowRunContext.get()
    ctx = SimpleNamespace(task_run=SimpleNamespace(name="late-1", flow_run_id=flow_ctx.flow_run.id))
    record_task_slice(ctx, lease, outcome="released", ran_s=1.0)  # registers the run's end hook
    flow_ctx.task_runner.cancel_all()  # a cancellation fires it first
    captured = contextvars.copy_context()

    def ends_after_the_main_thread():
        while threading.main_thread().is_alive():
            time.sleep(0.01)
        captured.run(record_task_slice, ctx, lease, outcome="cancelled", ran_s=2.0)

    threading.Thread(target=ends_after_the_main_thread).start()  # not a daemon: the exit waits for it
    return flow_ctx.flow_run.id


print("RUN", pipeline(), flush=True)
'''


def test_a_task_that_ends_while_its_cancelled_flows_process_exits_is_written_without_a_traceback(prefect_api, tmp_path):
    """The last tasks of a cancelled run (a served flow, a `process` pool) end after the process's
    main thread: Prefect's events worker can no longer start then, and each artifact write logged
    "Error emitting event: prefect.artifact.created" with a traceback (a new-user trial)."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter as ArtifactFilter
    from prefect.client.schemas.filters import ArtifactCollectionFilterKey as ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    from prefect_mig.integrations.prefect.artifacts import artifact_key

    (tmp_path / "late.py").write_text(LATE_TASK_SCRIPT)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([sys.executable, str(tmp_path / "late.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Error emitting event" not in output and "could not write" not in output, output[-3000:]
    (run_id,) = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("RUN ")]
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(run_id)])))
    rows = json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data
    assert [r["outcome"] for r in rows] == ["released", "cancelled"]
