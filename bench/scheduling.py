"""Scheduling benchmark: dynamic repartitioning against whole GPUs and static layouts.

Replays GPU pods of the Alibaba 2023 trace (../shared/traces, read in place) on one contended fleet
under every policy, through the real allocator scripts on a real redis-server, the real planner and
the node agents on the simulated NVML (`prefect_mig.simulation`). Then times the planner on 1,000
GPUs.

Workload, stated: three windows of the trace, each the first 1,000 GPU pods created from day 115,
125 and 135 on (--quick: the day-115 window only); run times capped at 2 h, arrivals replayed 8x
faster, mapping ``v100`` (a trace GPU is a V100-16GB; one
H100 compute slice is worth 1.13 V100s; see `prefect_mig.simulation.workload`), multi-GPU pods
split into whole-slice parts. Fleet: 8x H100-80GB. Layouts may use 1g.20gb (the 16 GB pods' best
fit). Reconfiguration: 10 s per re-carve.

Anchors (same run, per window): mean JCT of whole-gpu and of the best static layout that serves
every job (static:fitted is chosen in hindsight from the window's whole workload), and the
makespan's lower bound (max of total slice-work over capacity, and the latest arrival plus run
time). The JSON gives the geometric mean of each JCT ratio over the windows and the worst makespan
ratio; the table shows every window.

    .venv/bin/python bench/scheduling.py [--quick]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect_mig.model import enumerate_layouts, get_model  # noqa: E402
from prefect_mig.repartition.planner import GpuState, Knobs, model_profiles, plan  # noqa: E402
from prefect_mig.simulation.report import compare, plot, summary  # noqa: E402
from prefect_mig.simulation.workload import load_trace  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "alibaba-gpu-v2023" / "openb_pod_list_default.csv"
FLEET = "sim-0=8xH100-80GB"
PROFILES = "extended"
POLICIES = ("whole-gpu", "static:smallest", "static:mixed", "static:fitted", "dynamic")
SPEEDUP, MAX_DURATION_S, JOBS = 8.0, 7200.0, 1000
WINDOWS = (115, 125, 135)  # start days


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
    names = model_profiles("H100-80GB", knobs.profiles)
    names = [p.name for p in model.classic_profiles] if isinstance(names, str) else names
    demand = {f"H100-80GB/{p}": [1.0 + rng.random()] * rng.randint(50, 400) for p in names}
    times = []
    for _ in range(3):
        started = time.perf_counter()
        plan(gpus, demand, knobs)
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def run_window(start_day: float, knobs: Knobs, state_dir: str):
    jobs = load_trace(TRACE, mapping="v100", gpu_model="H100-80GB", start_s=start_day * 86400, jobs=JOBS,
                      max_duration_s=MAX_DURATION_S)
    jobs = [dataclasses.replace(j, arrival_s=j.arrival_s / SPEEDUP) for j in jobs]
    with RedisServer() as server:
        return compare(server.client(), jobs, fleet=FLEET, policies=POLICIES, knobs=knobs, state_dir=state_dir)


def geomean(values: list[float | None]) -> float | None:
    """None when a window has no ratio (a policy did not run every job to the end)."""
    if not values or any(v is None for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))  # type: ignore[arg-type]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the day-115 window only (about 15 s)")
    parser.add_argument("--png", default=str(ROOT / "bench" / "out" / "scheduling.png"))
    args = parser.parse_args()
    windows = WINDOWS[:1] if args.quick else WINDOWS
    knobs = Knobs(profiles=PROFILES)
    console = Console(width=150)
    table = Table(title=f"{JOBS} pods per window (x{SPEEDUP:g} arrivals, run time <= {MAX_DURATION_S:g} s) on {FLEET}")
    for col in ("day", "policy", "mean JCT s", "p95 JCT s", "mean wait s", "makespan/LB", "util leased",
                "util needed", "re-carves", "drains", "rejected", "violations", "wall s"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    per_window = []
    for day in windows:
        with tempfile.TemporaryDirectory() as state_dir:
            results = run_window(day, knobs, state_dir)
        doc = summary(results)
        if day == windows[0]:
            plot(results, args.png, title=f"{JOBS} Alibaba 2023 pods from day {day} on {FLEET}")
        for row in doc["policies"]:
            table.add_row(
                str(day), row["policy"], f"{row['jct_mean_s'] or 0:,.0f}", f"{row['jct_p95_s'] or 0:,.0f}",
                f"{row['wait_mean_s'] or 0:,.0f}", f"{row['makespan_vs_lower_bound'] or 0:.3f}",
                f"{row['utilization_leased']:.2f}", f"{row['utilization_needed']:.2f}", str(row["reconfigurations"]),
                str(row["range_drains"]), str(row["rejected"]), str(row["invariant_violations"]), f"{row['wall_s']:.1f}",
            )
        per_window.append({
            "start_day": day,
            "jct_ratio_vs_whole_gpu": doc["jct_ratio_vs_whole_gpu"],
            "jct_ratio_vs_best_static": doc["jct_ratio_vs_best_static"],
            "best_static": doc["best_static"],
            "makespan_vs_lower_bound": doc["makespan_vs_lower_bound"],
            "jct_mean_s": {r["policy"]: r["jct_mean_s"] for r in doc["policies"]},
        })
    plan_s = plan_time_1000_gpus(knobs)
    plan_classic_s = plan_time_1000_gpus(Knobs())
    console.print(table)
    vs_whole = geomean([w["jct_ratio_vs_whole_gpu"] for w in per_window])
    vs_static = geomean([w["jct_ratio_vs_best_static"] for w in per_window])
    makespans = [w["makespan_vs_lower_bound"] for w in per_window]
    makespan = None if None in makespans else max(makespans)
    console.print(
        f"dynamic / whole-gpu mean JCT {_fmt(vs_whole)} (target <= 0.5); dynamic / best static {_fmt(vs_static)} "
        f"(target <= 0.85; per window {', '.join(str(w['jct_ratio_vs_best_static']) for w in per_window)}); "
        f"worst makespan / lower bound {_fmt(makespan)} (target <= 1.25); plan 1,000 GPUs {plan_s:.3f} s with "
        f"1g.20gb layouts, {plan_classic_s:.3f} s classic (target < 1 s); plot: {args.png}"
    )
    figures = {
        "jct_ratio_vs_whole_gpu": _round(vs_whole),
        "jct_ratio_vs_best_static": _round(vs_static),
        "makespan_vs_lower_bound": _round(makespan),
        "plan_time_1000_gpus_s": round(plan_s, 4),
        "plan_time_1000_gpus_classic_s": round(plan_classic_s, 4),
        "fleet": FLEET,
        "mapping": "v100 (trace GPU = V100-16GB; 1 H100 compute slice = 1.13 V100; multi-GPU pods split into parts)",
        "jobs_per_window": JOBS,
        "speedup": SPEEDUP,
        "max_duration_s": MAX_DURATION_S,
        "windows": per_window,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
