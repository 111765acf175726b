"""Prefect events for automations, read back from the session's real Prefect API."""

from __future__ import annotations

import asyncio
import json
import time

from prefect import flow

from prefect_mig import MigTaskRunner, task

from .prefect_fixtures import read_lease_events


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


def test_the_agent_emits_layout_applied_about_the_gpu(prefect_api, alloc, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.integrations.prefect.events import emit_cluster_event
    from prefect_mig.model import Layout

    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        agent = NodeAgent(backend, alloc, node="node-a", on_event=emit_cluster_event)
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
    assert events[0].payload["node"] == "node-a"


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
