"""Scheduling benchmark: dynamic repartitioning against whole GPUs and static layouts.

Replays GPU pods of the Alibaba 2023 trace (../shared/traces, read in place) on one contended fleet
under every policy, through the real allocator scripts on a real redis-server, the real planner and
the node agents on the simulated NVML (`prefect_mig.simulation`). Then times the planner on 1,000
GPUs.

Workload, stated: pods created from trace day 115 on (the first 1,000; 300 with --quick), run
times capped at 2 h, arrivals replayed 8x faster, mapping ``v100`` (a trace GPU is a V100-16GB; one
H100 compute slice is worth 1.13 V100s; see `prefect_mig.simulation.workload`), multi-GPU pods
split into whole-slice parts. Fleet: 8x H100-80GB. Layouts may use 1g.20gb (the 16 GB pods' best
fit). Reconfiguration: 10 s per re-carve.

Anchors (same run): mean JCT of whole-gpu and of the best static layout that serves every job
(static:fitted is chosen in hindsight from the whole workload), and the makespan's lower bound
(max of total slice-work over capacity, and the latest arrival plus run time).

    .venv/bin/python bench/scheduling.py [--quick]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect_mig.model import Layout, Placement, enumerate_layouts, get_model  # noqa: E402
from prefect_mig.repartition.planner import GpuState, Knobs, plan  # noqa: E402
from prefect_mig.simulation.report import compare, plot, summary  # noqa: E402
from prefect_mig.simulation.workload import load_trace  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "alibaba-gpu-v2023" / "openb_pod_list_default.csv"
FLEET = "sim-0=8xH100-80GB"
PROFILES = ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")
POLICIES = ("whole-gpu", "static:smallest", "static:mixed", "static:fitted", "dynamic")
SPEEDUP, MAX_DURATION_S, START_DAY = 8.0, 7200.0, 115


def plan_time_1000_gpus(knobs: Knobs, seed: int = 1) -> float:
    """Median of 3 plans of 1,000 H100s in random enumerated layouts, 30 % of instances busy,
    against demand for every kind."""
    rng = random.Random(seed)
    model = get_model("H100-80GB")
    layouts = enumerate_layouts(model, knobs.profiles)
    gpus = []
    for i in range(1000):
        layout = rng.choice(layouts)
        busy = frozenset(p for p in layout.instances if rng.random() < 0.3)
        gpus.append(GpuState(gpu_uuid=f"GPU-{i:04d}", layout=layout, busy=busy))
    demand = {f"H100-80GB/{p}": [1.0 + rng.random()] * rng.randint(50, 400) for p in knobs.profiles}
    times = []
    for _ in range(3):
        from prefect_mig.repartition import planner

        planner._taken.cache_clear()
        planner._diff.cache_clear()
        started = time.perf_counter()
        plan(gpus, demand, knobs)
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 pods instead of 1,000 (under a minute)")
    parser.add_argument("--png", default=str(ROOT / "bench" / "out" / "scheduling.png"))
    args = parser.parse_args()
    jobs_n = 300 if args.quick else 1000
    knobs = Knobs(profiles=PROFILES)
    jobs = load_trace(TRACE, mapping="v100", gpu_model="H100-80GB", start_s=START_DAY * 86400, jobs=jobs_n,
                      max_duration_s=MAX_DURATION_S)
    jobs = [dataclasses.replace(j, arrival_s=j.arrival_s / SPEEDUP) for j in jobs]
    console = Console(stderr=False)
    with RedisServer() as server, tempfile.TemporaryDirectory() as state_dir:
        results = compare(server.client(), jobs, fleet=FLEET, policies=POLICIES, knobs=knobs, state_dir=state_dir)
    doc = summary(results)
    plot(results, args.png, title=f"{jobs_n} Alibaba 2023 pods on {FLEET}")
    plan_s = plan_time_1000_gpus(knobs)
    plan_classic_s = plan_time_1000_gpus(Knobs())

    table = Table(title=f"{jobs_n} pods (trace day {START_DAY}+, x{SPEEDUP:g} arrivals, run time <= {MAX_DURATION_S:g} s) on {FLEET}")
    for col in ("policy", "mean JCT s", "p95 JCT s", "mean wait s", "makespan/LB", "util leased", "util needed", "re-carves", "rejected", "wall s"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for row in doc["policies"]:
        table.add_row(
            row["policy"], f"{row['jct_mean_s'] or 0:,.0f}", f"{row['jct_p95_s'] or 0:,.0f}", f"{row['wait_mean_s'] or 0:,.0f}",
            f"{row['makespan_vs_lower_bound'] or 0:.3f}", f"{row['utilization_leased']:.2f}", f"{row['utilization_needed']:.2f}",
            str(row["reconfigurations"]), str(row["rejected"]), f"{row['wall_s']:.1f}",
        )
    console.print(table)
    console.print(
        f"dynamic / whole-gpu mean JCT {doc['jct_ratio_vs_whole_gpu']} (target <= 0.5); "
        f"dynamic / best static ({doc['best_static']}) {doc['jct_ratio_vs_best_static']} (target <= 0.85); "
        f"makespan / lower bound {doc['makespan_vs_lower_bound']} (target <= 1.25); "
        f"plan 1,000 GPUs {plan_s:.3f} s with 1g.20gb layouts, {plan_classic_s:.3f} s classic (target < 1 s); "
        f"plot: {args.png}"
    )
    figures = {
        "jct_ratio_vs_whole_gpu": doc["jct_ratio_vs_whole_gpu"],
        "jct_ratio_vs_best_static": doc["jct_ratio_vs_best_static"],
        "best_static": doc["best_static"],
        "makespan_vs_lower_bound": doc["makespan_vs_lower_bound"],
        "plan_time_1000_gpus_s": round(plan_s, 4),
        "plan_time_1000_gpus_classic_s": round(plan_classic_s, 4),
        "fleet": FLEET,
        "mapping": "v100 (trace GPU = V100-16GB; 1 H100 compute slice = 1.13 V100; multi-GPU pods split into parts)",
        "jobs": jobs_n,
        "speedup": SPEEDUP,
        "max_duration_s": MAX_DURATION_S,
        "jct_mean_s": {r["policy"]: r["jct_mean_s"] for r in doc["policies"]},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
