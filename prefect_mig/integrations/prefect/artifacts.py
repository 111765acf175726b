"""Per flow run artifacts: which task ran on which slice, how long it waited and ran.

Each time a task's lease ends, the task runner records one row for its flow run. A writer thread
then writes the run's table artifact (key `artifact_key`: ``prefect-mig-slices-<flow run id>``;
task, slice, node, GPU, waited, ran, fence, outcome) and a markdown summary
(``prefect-mig-summary-<flow run id>``) again, at most every `WRITE_EVERY_S`, so the newest version of
each holds every task of the run so far; when the flow run ends, what is left is written before the
flow call returns (`prefect_mig.integrations.prefect.flow_run_end`). The two API calls are never on
a task's own path: under load they cost a small task more than its body. The fence shown is that of
a lease that already ended: it no longer releases or renews anything.

Examples:
    ```python
    from prefect_mig.integrations.prefect.artifacts import artifact_key, summary_markdown

    assert artifact_key("8c0f-AB") == "prefect-mig-slices-8c0f-ab"
    rows = [{"task": "infer-0", "slice": "1g.10gb@4", "node": "node-a", "gpu": 0, "waited_s": 0.5,
             "ran_s": 2.0, "fence": 7, "outcome": "released"}]
    assert "1 task(s) on 1 slice(s)" in summary_markdown(rows)
    ```
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import logging
import threading
import time
from typing import Any

from prefect_mig.integrations.prefect.flow_run_end import has_ended, on_flow_run_end

log = logging.getLogger("prefect_mig.artifacts")

#: the longest a flow run's artifacts lag behind its tasks while it runs
WRITE_EVERY_S = 2.0

_rows_lock = threading.Lock()  # held briefly: tasks add rows under it
_write_lock = threading.Lock()  # one write at a time, each composed after the one before it
_rows: dict[str, list[dict[str, Any]]] = {}  # flow run id -> rows, in this (the flow's) process
_dirty: set[str] = set()  # flow runs with rows not written yet
_contexts: dict[str, contextvars.Context] = {}  # flow run id -> a task's context (Prefect's settings)
_wake = threading.Event()
_writer: threading.Thread | None = None


def artifact_key(flow_run_id: Any) -> str:
    """The key of a flow run's table artifact (Prefect keys: lowercase letters, digits, dashes)."""
    return f"prefect-mig-slices-{str(flow_run_id).lower()}"


def summary_key(flow_run_id: Any) -> str:
    return f"prefect-mig-summary-{str(flow_run_id).lower()}"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The markdown summary of a flow run's rows."""
    slices = {(r["node"], r["gpu"], r["slice"]) for r in rows}
    waited = sum(r["waited_s"] for r in rows)
    ran = sum(r["ran_s"] for r in rows)
    ended = {}
    for r in rows:
        ended[r["outcome"]] = ended.get(r["outcome"], 0) + 1
    lines = [
        "### MIG slices used by this flow run",
        f"{len(rows)} task(s) on {len(slices)} slice(s); waited {waited:.1f} s in all, ran {ran:.1f} s in all.",
        "",
        "| outcome | tasks |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(ended.items())),
        "",
        "The table artifact `{key}` lists each task's slice, node, GPU, wait, run time and fence.",
    ]
    return "\n".join(lines)


def record_task_slice(ctx, lease, *, outcome: str, ran_s: float) -> str | None:
    """Add the ended lease of `ctx`'s task run to its flow run's artifacts (written in the
    background, see the module); returns the table key (None outside a flow run). Failures to write
    are logged: they never fail the task."""
    if ctx is None or not getattr(ctx.task_run, "flow_run_id", None):
        return None
    s = lease.slice
    flow_run_id = str(ctx.task_run.flow_run_id)
    row = {
        "task": ctx.task_run.name,
        "slice": f"{s.profile}@{s.start}",
        "node": s.node,
        "gpu": s.gpu_index,
        "waited_s": round(lease.info.waited_ms / 1000, 3),
        "ran_s": round(ran_s, 3),
        "fence": lease.fence,
        "outcome": outcome,
    }
    with _rows_lock:
        while len(_rows) >= 100 and flow_run_id not in _rows:  # a long-lived process: keep the newest runs
            oldest = next(iter(_rows))
            _dirty.discard(oldest)
            _rows.pop(oldest)
            _contexts.pop(oldest, None)
        _rows.setdefault(flow_run_id, []).append(row)
        _contexts.setdefault(flow_run_id, contextvars.copy_context())
        _dirty.add(flow_run_id)
    from prefect.context import FlowRunContext

    flow_ctx, name = FlowRunContext.get(), ("artifacts", flow_run_id)
    on_flow_run_end(flow_ctx, name, functools.partial(flush, flow_run_id))
    if has_ended(flow_ctx, name):
        # a task that ends after its run's end hook ran (stopped by the run's cancellation, which
        # fires the hook first): written now, while Prefect's client still works; left to the
        # writer, it lost the race with the process's exit (rows missing, errors logged at exit)
        flush(flow_run_id)
        return artifact_key(flow_run_id)
    _start_writer()
    _wake.set()
    return artifact_key(flow_run_id)


def flush(flow_run_id: str | None = None) -> None:
    """Write the artifacts of `flow_run_id` (None: of every flow run) that have rows not written yet."""
    # the newest version must be the one with every row: writes take turns, and each composes its
    # table after the one before it was written
    with _write_lock:
        with _rows_lock:
            runs = [r for r in _dirty if flow_run_id in (None, r)]
            tables = {r: ([dict(row) for row in _rows.get(r, [])], _contexts[r]) for r in runs}
            _dirty.difference_update(runs)
        for run, (table, context) in tables.items():
            try:  # with the settings (API URL) of the flow run's own context, from whatever thread
                context.copy().run(_write, run, table)
            except Exception as exc:  # noqa: BLE001 - an artifact is a report, never a reason to fail the task
                log.warning("could not write the artifacts of flow run %s: %s", run, exc)


def _write(flow_run_id: str, table: list[dict[str, Any]]) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.context import SyncClientContext
    from prefect.events.utilities import emit_event

    # a client of our own, with the settings of the context we run in (a copy of a task's): the
    # context's own client is the flow engine's, closed once the run has ended, and a cancelled
    # run's last tasks end after that
    SyncClientContext.__var__.set(None)
    key, run = artifact_key(flow_run_id), UUID(flow_run_id)
    artifacts = [
        ArtifactCreate(type="table", key=key, flow_run_id=run, data=json.dumps(table),
                       description="Which task ran on which MIG slice (prefect-mig)."),
        ArtifactCreate(type="markdown", key=summary_key(flow_run_id), flow_run_id=run,
                       data=summary_markdown(table).replace("{key}", key),
                       description="MIG slices used by this flow run (prefect-mig)."),
    ]
    with get_client(sync_client=True) as client:
        for artifact in artifacts:
            created = client.request("POST", "/artifacts/", json=artifact.model_dump(mode="json", exclude_unset=True)).json()
            # Prefect's own create_artifact emits this event too, but also once the process has
            # begun to exit (a cancelled run's last tasks end as its main thread does, or after
            # it), when its events worker cannot start any more and each emit logs a traceback;
            # checked here, right before the emit, the artifact then goes without its event
            if getattr(threading, "_SHUTTING_DOWN", False) or not threading.main_thread().is_alive():
                continue
            emit_event(
                event="prefect.artifact.created",
                resource={"prefect.resource.id": f"prefect.artifact.{created['id']}", "prefect.resource.name": created["key"]},
                payload={"key": created["key"], "type": created["type"], "description": created["description"]},
            )


def _start_writer() -> None:
    global _writer
    with _rows_lock:
        if _writer is not None:
            return
        _writer = threading.Thread(target=_write_loop, daemon=True, name="prefect-mig-artifacts")
    _writer.start()
    atexit.register(flush)


def _write_loop() -> None:
    while True:
        _wake.wait()
        _wake.clear()
        flush()
        time.sleep(WRITE_EVERY_S)  # rows that come meanwhile go in the next write


def latest_artifact_key() -> str | None:
    """The key of the newest flow run table artifact on the Prefect API (None if none or no API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
    from prefect.client.schemas.sorting import ArtifactCollectionSort

    try:
        with get_client(sync_client=True) as client:
            found = client.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_="prefect-mig-slices-")),
                sort=ArtifactCollectionSort.CREATED_DESC,
                limit=1,
            )
    except Exception as exc:  # noqa: BLE001 - the demo only mentions it
        log.warning("could not read the artifacts: %s", exc)
        return None
    return found[0].key if found else None

