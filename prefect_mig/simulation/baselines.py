"""Baselines dynamic repartitioning is measured against, beyond whole GPUs and named layouts.

- **The best static mix, searched in hindsight** (``static:searched``). MISO (Li et al., "MISO:
  Exploiting Multi-Instance GPU Capability on Multi-Tenant GPU Clusters", SoCC 2022) compares
  against the "optimal static partition": the one fixed MIG mix that serves the whole workload
  best, known only afterwards. `search_static` approximates it: it scores mixes with `quick_static`
  (a pure-Python replay of a fixed layout with the allocator's order, ``enqueue time - priority x
  aging``, and best-fit grants), starting from every homogeneous mix, every homogeneous mix plus one
  whole GPU, and the planner's ``fitted`` mix, then improves the best by swapping one GPU's layout at
  a time. `prefect_mig.simulation.report.compare` replays the few best-scored mixes and ``fitted``
  through the real simulator and keeps the one with the lowest mean JCT, so the searched baseline
  is never worse than ``fitted``.
- **Fractional sharing without isolation** (``sharing``): no MIG; time-slicing / MPS style, each
  GPU holds any jobs whose memory fits (best fit by memory: the GPU with the least free memory that
  holds the part), waiting jobs in the allocator's order, later ones backfilling. `share` replays it
  as processor sharing with a stated interference model:

  - a job alone on its GPU runs at full speed (so with jobs that each need a whole GPU, sharing is
    exactly whole-GPU);
  - jobs sharing a GPU each run ``1 + interference`` times slower (default 0.3: Villarrubia et al.,
    "A comprehensive evaluation of spatial co-execution on GPUs using MPS and MIG technologies",
    arXiv:2604.22430, 2026, measure MPS co-execution about 30 % slower under memory contention and
    up to 30 % faster in the best cases; we take the contended figure, as trace pods share memory
    bandwidth);
  - and when the co-runners' compute needs add up to more than the GPU's compute slices, each gets
    its share (the GPU's compute is never oversubscribed, so the makespan lower bound holds).

Examples:
    ```python
    from prefect_mig.simulation.baselines import quick_static, search_static
    from prefect_mig.simulation.workload import Job

    jobs = [Job(f"j{i}", 0, 100, ((10.0, 1),)) for i in range(7)]
    whole = quick_static(jobs, "H100-80GB", ("7g.80gb@0",))
    sliced = quick_static(jobs, "H100-80GB", (" + ".join(f"1g.10gb@{i}" for i in range(7)),))
    assert (whole, sliced) == (400.0, 100.0)
    best = search_static(jobs, "H100-80GB", gpus=1, profiles="extended")[0]
    assert quick_static(jobs, "H100-80GB", best) == 100.0
    ```
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence

from prefect_mig.model import FleetSpec, Layout, SliceRequirement, get_model
from prefect_mig.simulation.engine import JobResult, SimResult, fleet_capacity, lower_bound, queue_kind
from prefect_mig.simulation.policies import layouts_of
from prefect_mig.simulation.workload import Job

SHARING_INTERFERENCE = 0.3  # see the module docstring for the source


def _holders(need: tuple[float, int], model_name: str, offered: set[str]) -> tuple[str, ...]:
    model = get_model(model_name)
    requirement = SliceRequirement(min_memory_gb=need[0], min_compute_slices=need[1])
    return tuple(p.name for p in requirement.candidates(model) if p.name in offered)


def quick_static(jobs: Sequence[Job], model_name: str, layouts: Sequence[str], *, aging_s: float = 600.0) -> float | None:
    """Mean JCT of `jobs` on GPUs carved `layouts` (one per GPU) that never change, or None when a
    part fits no slice. A new part takes the smallest free slice that holds it; a freed slice goes
    to the best-ordered waiting part it holds."""
    free: Counter[str] = Counter()
    for text in layouts:
        for inst in Layout.parse(model_name, text).instances:
            free[inst.profile] += 1
    holders: dict[tuple[float, int], tuple[str, ...]] = {}
    for job in jobs:
        for part in job.parts:
            if part not in holders:
                holders[part] = _holders(part, model_name, set(free))
                if not holders[part]:
                    return None
    takers: dict[str, list[tuple[float, int]]] = {}
    for need, names in holders.items():
        for name in names:
            takers.setdefault(name, []).append(need)
    waiting: dict[tuple[float, int], list[tuple[float, int, int]]] = {need: [] for need in holders}
    events: list[tuple[float, int, int, str]] = [(j.arrival_s, 0, i, "") for i, j in enumerate(jobs)]
    heapq.heapify(events)
    open_parts = [len(j.parts) for j in jobs]
    total = 0.0
    seq = 0
    while events:
        t, kind, i, profile = heapq.heappop(events)
        job = jobs[i]
        if kind == 0:  # arrival: each part takes the smallest free holder or waits
            for need in job.parts:
                name = next((n for n in holders[need] if free[n]), None)
                if name is None:
                    seq += 1
                    heapq.heappush(waiting[need], (t - job.priority * aging_s, seq, i))
                else:
                    free[name] -= 1
                    heapq.heappush(events, (t + job.duration_s, 1, i, name))
            continue
        open_parts[i] -= 1
        if open_parts[i] == 0:
            total += t - job.arrival_s
        heads = [(waiting[need][0], need) for need in takers[profile] if waiting[need]]
        if heads:
            (_, _, k), need = min(heads)
            heapq.heappop(waiting[need])
            heapq.heappush(events, (t + jobs[k].duration_s, 1, k, profile))
        else:
            free[profile] += 1
    return total / len(jobs) if jobs else 0.0


def search_static(
    jobs: Sequence[Job],
    model_name: str,
    *,
    gpus: int,
    profiles="extended",
    start: Sequence[Sequence[str]] = (),
    keep: int = 3,
    max_evals: int = 600,
    aging_s: float = 600.0,
) -> list[tuple[str, ...]]:
    """The `keep` mixes (one layout per GPU, sorted) with the lowest `quick_static` mean JCT, best
    first, from homogeneous mixes, homogeneous plus one whole GPU, `start`, and single-GPU swaps
    from the best (at most `max_evals` replays)."""
    layouts = [str(l) for l in layouts_of(model_name, profiles)]
    model = get_model(model_name)
    whole = max(model.profiles, key=lambda p: (p.compute_slices, p.memory_mib)).name + "@0"
    if whole not in layouts:
        layouts.append(whole)
    scores: dict[tuple[str, ...], float] = {}

    def score(mix: Sequence[str]) -> float:
        key = tuple(sorted(mix))
        if key not in scores and len(scores) < max_evals:
            got = quick_static(jobs, model_name, key, aging_s=aging_s)
            scores[key] = math.inf if got is None else got
        return scores.get(key, math.inf)

    per_layout = {}
    for layout in layouts:
        per_layout[layout] = min(score([layout] * gpus), score([layout] * (gpus - 1) + [whole]) if gpus > 1 else math.inf)
    for mix in start:
        score(mix)
    shortlist = sorted(layouts, key=lambda l: (per_layout[l], l))[:16]
    best = min(scores, key=lambda k: (scores[k], k))
    for _ in range(3):  # single-GPU swaps from the best until none helps
        swaps = [(old, new) for old in sorted(set(best)) for new in shortlist if new != old]
        moved = min(
            (tuple(sorted([*best[: best.index(old)], new, *best[best.index(old) + 1 :]])) for old, new in swaps),
            key=lambda mix: (score(mix), mix),
            default=best,
        )
        if score(moved) >= scores[best]:
            break
        best = moved
    ranked = sorted((k for k, v in scores.items() if v < math.inf), key=lambda k: (scores[k], k))
    return ranked[:keep]


def share(jobs: Sequence[Job], fleet: str, *, interference: float = SHARING_INTERFERENCE, aging_s: float = 600.0) -> SimResult:
    """Replay `jobs` with fractional GPU sharing without isolation (see the module docstring)."""
    spec = FleetSpec.parse(fleet)
    capacity, memory_gb = fleet_capacity(spec)
    gpus = []
    for node in spec.nodes:
        for m in node.gpus:
            biggest = max(get_model(m).profiles, key=lambda p: (p.compute_slices, p.memory_mib))
            gpus.append({"memory": float(biggest.memory_gb), "compute": biggest.compute_slices, "running": set()})
    results = [JobResult(j.name, j.qos, j.priority, j.arrival_s, j.duration_s, parts_left=len(j.parts)) for j in jobs]
    parts = [(i, need) for i, j in enumerate(jobs) for need in j.parts]
    left = [jobs[i].duration_s for i, _ in parts]  # seconds of work at full speed
    open_parts = [len(j.parts) for j in jobs]
    rejected = [n for n, j in enumerate(jobs) if any(m > max(g["memory"] for g in gpus) for m, _ in j.parts)]
    for n in rejected:
        results[n].rejected = True
    arrivals = sorted((jobs[i].arrival_s, p) for p, (i, _) in enumerate(parts) if not results[i].rejected)
    waiting: list[tuple[float, int]] = []
    timeline: list[tuple[float, int, int, int]] = [(0.0, 0, 0, 0)]
    kinds = [queue_kind(need, spec) for _, need in parts]
    queue_by_kind: dict[str, list[tuple[float, int]]] = {}

    def count(p: int, delta: int) -> None:
        rows = queue_by_kind.setdefault(kinds[p], [(0.0, 0)])
        if rows[-1][0] == t:
            rows[-1] = (t, rows[-1][1] + delta)
        else:
            rows.append((t, rows[-1][1] + delta))
    t, a = 0.0, 0

    def rate(g: dict) -> float:
        running = g["running"]
        if not running:
            return 0.0
        need = sum(parts[p][1][1] for p in running)
        slow = 1.0 + interference if len(running) > 1 else 1.0
        return min(1.0, g["compute"] / need) / slow

    while a < len(arrivals) or any(g["running"] for g in gpus):
        rates = [rate(g) for g in gpus]
        finish = min(
            ((t + left[p] / rates[k], p) for k, g in enumerate(gpus) for p in g["running"]), default=(math.inf, -1)
        )
        nxt = min(finish[0], arrivals[a][0] if a < len(arrivals) else math.inf)
        for k, g in enumerate(gpus):
            for p in g["running"]:
                left[p] -= (nxt - t) * rates[k]
        t = nxt
        while a < len(arrivals) and arrivals[a][0] <= t:
            p = arrivals[a][1]
            i = parts[p][0]
            waiting.append((jobs[i].arrival_s - jobs[i].priority * aging_s, p))
            count(p, +1)
            a += 1
        for k, g in enumerate(gpus):
            for p in [p for p in g["running"] if left[p] <= 1e-6]:
                g["running"].discard(p)
                g["memory"] += parts[p][1][0]
                i = parts[p][0]
                open_parts[i] -= 1
                if open_parts[i] == 0:
                    results[i].end_s = t
        waiting.sort()
        still = []
        for key, p in waiting:
            memory = parts[p][1][0]
            fits = [g for g in gpus if g["memory"] >= memory - 1e-9]
            if not fits:
                still.append((key, p))
                continue
            g = min(fits, key=lambda g: g["memory"])
            g["memory"] -= memory
            g["running"].add(p)
            count(p, -1)
            i = parts[p][0]
            results[i].parts_left -= 1
            if results[i].parts_left == 0:
                results[i].start_s = t
        waiting = still
        busy = sum(parts[p][1][1] for g in gpus for p in g["running"])
        row = (t, min(busy, capacity), busy, len(waiting))
        if timeline[-1][0] == t:
            timeline[-1] = row
        else:
            timeline.append(row)
    ran = [j for j, r in zip(jobs, results) if not r.rejected]
    return SimResult(
        policy="sharing",
        fleet=str(spec),
        capacity=capacity,
        jobs=results,
        rejected=[jobs[n].name for n in rejected],
        unfinished=[r.name for r in results if r.end_s is None and not r.rejected],
        timeline=timeline,
        reconfigurations=0,
        range_drains=0,
        skipped_changes=0,
        lower_bound_s=lower_bound(ran, capacity, memory_gb) if ran else 0.0,
        queue_by_kind=queue_by_kind,
    )
