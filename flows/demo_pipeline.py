"""The demo pipeline: batch inference fanned out over 1g slices, and a 3g fine-tune at a higher
priority, on one GPU carved 3g + 3x1g.

Run it with ``make demo`` (or ``prefect-mig demo``): on the embedded defaults it starts a private
redis-server, carves a simulated H100-80GB (no GPU needed) through the GPU backend, publishes it
with the node agent, and runs the flow on an ephemeral Prefect API (or the one PREFECT_API_URL
names). Every task body runs in a container of the local Docker engine bound to its slice.
"""

from __future__ import annotations

import time

from prefect import flow

from prefect_mig import MigTaskRunner, task

IMAGE = "prefect-mig-python:bookworm"


@task(task_runner=MigTaskRunner(profile="1g.10gb", priority=3, image=IMAGE), retries=1)
def infer(batch: int) -> dict:
    """Pretend to score one batch on a 1g slice."""
    import os
    import time

    started = time.time()
    time.sleep(0.8)
    print(f"batch {batch}: scored 256 items on {os.environ['CUDA_VISIBLE_DEVICES']}")
    return {"task": f"infer[{batch}]", "slice": os.environ["CUDA_VISIBLE_DEVICES"], "start": started,
            "end": time.time(), "task_run_id": os.environ["PREFECT_MIG_TASK_RUN_ID"]}


@task(task_runner=MigTaskRunner(profile="3g.40gb", priority=9, image=IMAGE))
def fine_tune(epochs: int) -> dict:
    """Pretend to fine-tune for a few epochs on a 3g slice."""
    import os
    import time

    started = time.time()
    for epoch in range(epochs):
        time.sleep(0.5)
        print(f"epoch {epoch}: loss {1.0 / (epoch + 1):.3f}")
    return {"task": "fine_tune", "slice": os.environ["CUDA_VISIBLE_DEVICES"], "start": started,
            "end": time.time(), "task_run_id": os.environ["PREFECT_MIG_TASK_RUN_ID"]}


@flow(name="mig-demo-pipeline")
def demo_pipeline(batches: int = 9, epochs: int = 4) -> list[dict]:
    tuned = fine_tune.submit(epochs)
    scored = infer.map(range(batches))
    return [tuned.result(), *[f.result() for f in scored]]


def summarize(results: list[dict], slices: list[dict], events: list[dict]):
    """Rows (task, slice, waited s, ran s), utilization per slice (busy / span) and the span: from
    the first body's start to the last body's end."""
    wall_s = max(r["end"] for r in results) - min(r["start"] for r in results)
    names = {s["mig_uuid"]: f"{s['profile']}@{s['start']} GPU {s['gpu_index']}" for s in slices}
    waited = {
        e.get("holder", "").rpartition("/")[2]: int(e.get("waited_ms", 0)) / 1000
        for e in events
        if e["type"] == "lease.granted"
    }
    rows = [
        [r["task"], names.get(r["slice"], r["slice"]), f"{waited.get(r['task_run_id'], 0.0):.2f}", f"{r['end'] - r['start']:.2f}"]
        for r in results
    ]
    busy: dict[str, float] = {}
    for r in results:
        key = names.get(r["slice"], r["slice"])
        busy[key] = busy.get(key, 0.0) + (r["end"] - r["start"])
    return rows, {k: v / wall_s for k, v in sorted(busy.items())}, wall_s


if __name__ == "__main__":
    started = time.time()
    print(demo_pipeline())
    print(f"took {time.time() - started:.1f} s")
