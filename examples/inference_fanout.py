"""Batch inference fanned out over 1g MIG slices.

    python examples/inference_fanout.py

Each batch is a Prefect task whose body runs in a container bound to its own 1g slice; with three
1g slices, three batches run at a time and the rest wait (their runs show ``AwaitingMIG``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cluster import cluster  # noqa: E402
from prefect import flow  # noqa: E402

from prefect_mig import MigTaskRunner, task  # noqa: E402


@task(task_runner=MigTaskRunner(profile="1g.10gb", priority=5), retries=1)
def score(batch: list[float]) -> dict:
    import os

    return {"device": os.environ["CUDA_VISIBLE_DEVICES"], "mean": sum(batch) / len(batch)}


@flow(name="inference-fanout")
def inference_fanout(n_batches: int = 6) -> list[dict]:
    batches = [[float(i + j) for j in range(8)] for i in range(n_batches)]
    return [f.result() for f in score.map(batches)]


def main(n_batches: int = 6) -> list[dict]:
    with cluster():
        return inference_fanout(n_batches)


if __name__ == "__main__":
    for row in main():
        print(row)
