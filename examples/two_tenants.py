"""Two tenants share one GPU: quotas, priorities and preemption.

    python examples/two_tenants.py

- ``research`` may hold at most 2 slices at once (quota) and runs preemptible work at priority 2.
- ``prod`` runs a 3g job at priority 8. When research holds the only 3g slice preemptibly, prod's
  request revokes it: research's task fails with "revoked" after a short grace period, its retry
  waits, and prod runs.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cluster import cluster, wait_for_lease  # noqa: E402
from prefect import flow  # noqa: E402

from prefect_mig import MigTaskRunner, task  # noqa: E402
from prefect_mig.allocator import Quota  # noqa: E402


@task(task_runner=MigTaskRunner(profile="1g.10gb", priority=2, tenant="research", preemptible=True))
def explore(i: int) -> str:
    import os
    import time

    time.sleep(1.0)
    return os.environ["CUDA_VISIBLE_DEVICES"]


@task(task_runner=MigTaskRunner(profile="3g.40gb", priority=2, tenant="research", preemptible=True, lease_ttl_s=3),
      retries=1, retry_delay_seconds=0)
def long_sweep() -> str:
    import os
    import time

    # the first try is revoked for prod long before it would end; the retry is short
    time.sleep(60 if os.environ["PREFECT_MIG_RUN_COUNT"] == "1" else 1)
    return "sweep done"


@task(task_runner=MigTaskRunner(profile="3g.40gb", priority=8, tenant="prod"))
def serve_model() -> str:
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"]


@flow(name="two-tenants")
def two_tenants() -> dict:
    sweep = long_sweep.submit()
    explored = explore.map(range(4))
    wait_for_lease("research", "3g.40gb")  # the sweep holds the only 3g slice
    served = serve_model.submit()
    return {
        "research_1g": [f.result() for f in explored],
        "prod_3g": served.result(),
        "sweep": sweep.result(),  # its first try was revoked for prod; the retry ran after prod
    }


def main() -> dict:
    with cluster("two-tenants") as alloc:
        alloc.set_quota("research", Quota(slices=2))
        outcome = two_tenants()
        outcome["revocations"] = sum(1 for e in alloc.events() if e["type"] == "lease.revoked")
        outcome["events"] = alloc.events()
        return outcome


if __name__ == "__main__":
    result = main()
    result.pop("events")
    print(result)
