"""Per flow run artifacts: which task ran on which slice, how long it waited and ran.

Each time a task's lease ends, the task runner records one row for its flow run and writes the
run's table artifact (key `artifact_key`: ``prefect-mig-slices-<flow run id>``; task, slice, node,
GPU, waited, ran, fence, outcome) and a markdown summary (``prefect-mig-summary-<flow run id>``)
again, so the newest version of each holds every task of the run so far. The fence shown is that of
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

import logging
import threading
from typing import Any

log = logging.getLogger("prefect_mig.artifacts")

_lock = threading.Lock()
_rows: dict[str, list[dict[str, Any]]] = {}  # flow run id -> rows, in this (the flow's) process


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
    """Add the ended lease of `ctx`'s task run to its flow run's artifacts; returns the table key
    (None outside a flow run). Failures to write are logged: they never fail the task."""
    if ctx is None or not getattr(ctx.task_run, "flow_run_id", None):
        return None
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

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
    key = artifact_key(flow_run_id)
    # written under the lock: tasks of one run end concurrently, and the newest version must be the
    # one with every row (a version composed earlier must not land after it)
    with _lock:
        while len(_rows) >= 100 and flow_run_id not in _rows:  # a long-lived process: keep the newest runs
            _rows.pop(next(iter(_rows)))
        rows = _rows.setdefault(flow_run_id, [])
        rows.append(row)
        table = [dict(r) for r in rows]
        try:
            # _sync: in an async flow's task thread Prefect would hand back a coroutine nobody awaits
            create_table_artifact(table, key=key, description="Which task ran on which MIG slice (prefect-mig).", _sync=True)
            create_markdown_artifact(summary_markdown(table).replace("{key}", key), key=summary_key(flow_run_id),
                                     description="MIG slices used by this flow run (prefect-mig).", _sync=True)
        except Exception as exc:  # noqa: BLE001 - an artifact is a report, never a reason to fail the task
            log.warning("could not write the artifacts of flow run %s: %s", flow_run_id, exc)
    return key


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

