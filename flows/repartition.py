"""The repartitioning service as a Prefect flow, to deploy on a schedule or on pipeline-run events.

    prefect work-pool create mig-process --type process
    prefect deploy flows/repartition.py:repartition --name mig-repartition --pool mig-process --cron "*/5 * * * *"

(or ``prefect deploy --name mig-repartition`` with the repository's ``prefect.yaml``, which has both
the schedule and the trigger). To re-carve when pipeline runs end, add a trigger to the deployment.
The run that just ended freed its slices a moment ago, so a triggered run passes ``idle_window_s: 0``
(the end of the pipeline run *is* the idle window; scheduled runs keep the default). The
``match_related`` filter leaves out this flow's own runs, which would otherwise trigger the next:

    triggers:
      - type: event
        match: {"prefect.resource.id": "prefect.flow-run.*"}
        match_related: {"prefect.resource.role": "flow", "prefect.resource.name": "!mig-repartition"}
        expect: ["prefect.flow-run.Completed"]
        parameters: {"idle_window_s": 0}

One run plans every GPU against the live queue and recent grants and writes the changes as desired
layouts; each node's ``prefect-mig agent`` applies its GPUs'. Busy slices are never destroyed; while
nothing waits, only slices idle for ``idle_window_s`` change and nothing is drained.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from prefect_mig.allocator import Allocator
from prefect_mig.repartition import Knobs
from prefect_mig.repartition.planner import profile_set
from prefect_mig.repartition.service import run_once


@flow(name="mig-repartition")
def repartition(
    redis_url: str | None = None,
    namespace: str | None = None,
    drain_cost: float = Knobs.drain_cost,
    idle_window_s: float = Knobs.idle_window_s,
    profiles: str = "extended",
) -> list[dict]:
    """Plan once and desire the changes; `profiles`: classic, extended (adds 1g.20gb) or all."""
    import redis

    from prefect_mig.allocator.embedded import redis_url as configured_url
    from prefect_mig.settings import load_settings

    settings = load_settings()
    allocator = Allocator(redis.Redis.from_url(redis_url or configured_url(settings)), namespace or settings.namespace)
    knobs = Knobs(drain_cost=drain_cost, idle_window_s=idle_window_s, profiles=profile_set(profiles))
    changes = run_once(allocator, knobs=knobs)
    logger = get_run_logger()
    for p in changes:
        logger.info("desired %s on %s %s: %s -> %s", p.kind, p.node, p.gpu_uuid, p.current, p.target)
    return [{"gpu_uuid": p.gpu_uuid, "kind": p.kind, "target": str(p.target)} for p in changes]


if __name__ == "__main__":
    print(repartition())
