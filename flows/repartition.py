"""The repartitioning service as a Prefect flow, to deploy on a schedule or on pipeline-run events.

    prefect deploy flows/repartition.py:repartition --name mig-repartition --cron "*/5 * * * *"

One run plans every GPU against the live queue and recent grants and writes the changes as desired
layouts; each node's ``prefect-mig agent`` applies its GPUs'. Busy slices are never destroyed.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from prefect_mig.allocator import Allocator
from prefect_mig.repartition import Knobs
from prefect_mig.repartition.service import run_once


@flow(name="mig-repartition")
def repartition(redis_url: str | None = None, namespace: str | None = None, drain_cost: float = 2.0) -> list[dict]:
    import redis

    from prefect_mig.allocator.embedded import redis_url as configured_url
    from prefect_mig.settings import load_settings

    settings = load_settings()
    allocator = Allocator(redis.Redis.from_url(redis_url or configured_url(settings)), namespace or settings.namespace)
    changes = run_once(allocator, knobs=Knobs(drain_cost=drain_cost))
    logger = get_run_logger()
    for p in changes:
        logger.info("desired %s on %s %s: %s -> %s", p.kind, p.node, p.gpu_uuid, p.current, p.target)
    return [{"gpu_uuid": p.gpu_uuid, "kind": p.kind, "target": str(p.target)} for p in changes]


if __name__ == "__main__":
    print(repartition())
