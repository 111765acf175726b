"""Running several policies on one workload and fleet, and writing what they measured.

`compare` runs each policy on the same jobs and fleet (a fresh namespace each; ``sharing`` and
``static:searched`` are the baselines of `prefect_mig.simulation.baselines`), `ratios` gives the
headline figures (dynamic against whole GPUs, against the best static layout that serves every job,
against the searched static mix and against fractional sharing, and the makespan against its lower
bound; a policy that rejects or strands a job is never a baseline), `plot` draws utilization and
queue depth per slice kind over time into a PNG (matplotlib, headless), `summary` is the JSON
document and `provenance` what it records to repeat the run.

Examples:
    ```python
    import tempfile
    from prefect_mig.simulation.report import compare, ratios
    from prefect_mig.simulation.workload import synthetic
    from prefect_mig.testing.redis_server import RedisServer

    jobs = synthetic(jobs=40, mean_interarrival_s=5, mean_duration_s=120)
    with RedisServer() as server:
        results = compare(server.client(), jobs, fleet="n=2xH100-80GB",
                          policies=["whole-gpu", "static:mixed", "dynamic"], state_dir=tempfile.mkdtemp())
    assert ratios(results)["jct_ratio_vs_whole_gpu"] < 1
    ```
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from prefect_mig.errors import ConfigError
from prefect_mig.model import FleetSpec
from prefect_mig.repartition.planner import Knobs
from prefect_mig.simulation.engine import SimConfig, SimResult, Simulator
from prefect_mig.simulation.baselines import search_static, share
from prefect_mig.simulation.policies import Policy, fitted_layouts, parse_policy
from prefect_mig.simulation.workload import Job

DEFAULT_POLICIES = (
    "whole-gpu", "sharing", "static:smallest", "static:mixed", "static:fitted", "static:searched", "proportional",
    "dynamic",
)
#: policies `compare` runs itself (see `prefect_mig.simulation.baselines`), not through `parse_policy`
COMPARISON_POLICIES = ("sharing", "static:searched")


def fleet_model(spec: FleetSpec) -> str:
    """The fleet's one GPU model.

    Raises:
        ConfigError: the fleet mixes models (policies are layouts of one model).
    """
    models = sorted({m for node in spec.nodes for m in node.gpus})
    if len(models) != 1:
        raise ConfigError(
            f"fleet: {str(spec)!r} mixes GPU models ({', '.join(models)}); the simulator compares policies on one model.",
            field="fleet",
            value=str(spec),
        )
    return models[0]


def compare(
    client: redis.Redis,
    jobs: Sequence[Job],
    *,
    fleet: str,
    policies: Sequence[str] = DEFAULT_POLICIES,
    knobs: Knobs = Knobs(),
    state_dir: str | Path,
    reconfig_cost_s: float = 10.0,
    progress: Callable[[str, int, int], None] | None = None,
    finalists: int = 3,
    history: Sequence[Job] = (),
    plan_while_idle: bool = True,
) -> list[SimResult]:
    """Run every policy on the same jobs and fleet; `progress(policy, done, total)` as they go.
    ``static:searched`` replays its `finalists` best-scored mixes and ``fitted`` (see
    `searched_static`). With `history` (the jobs *before* these, which a running service has
    seen), the dynamic policies start from the best static mix for that history instead of
    ``mixed``: knowledge of the past only, where ``static:searched`` knows the future.
    `plan_while_idle`: see `SimConfig`."""
    spec = FleetSpec.parse(fleet)
    model = fleet_model(spec)
    gpus = sum(len(node.gpus) for node in spec.nodes)
    results = []

    def run(name: str, policy: Policy) -> SimResult:
        config = SimConfig(fleet=str(spec), policy=policy, knobs=knobs, reconfig_cost_s=reconfig_cost_s,
                           plan_while_idle=plan_while_idle)
        report = None if progress is None else (lambda done, total, n=name: progress(n, done, total))
        sub = Path(state_dir) / f"{len(results)}-{name.replace(':', '-').replace('@', '_').replace(' ', '')[:60]}"
        return Simulator(client, jobs, config, state_dir=sub, progress=report).run()

    replayed: dict[tuple[str, ...], SimResult] = {}  # static mixes already run, by their sorted layouts

    def run_static(name: str, policy: Policy) -> SimResult:
        """A static mix runs once per comparison: ``static:searched`` reuses ``fitted``'s replay
        when the search keeps that mix (the GPUs' order may differ; the multiset is the same)."""
        key = tuple(sorted(policy.layout_for(i) for i in range(gpus)))
        if key not in replayed:
            replayed[key] = run(name, policy)
        return dataclasses.replace(replayed[key], policy=name)

    warm = search_static(history, model, gpus=gpus, profiles=knobs.profiles, keep=1) if history else []
    for name in policies:
        if name == "sharing":
            results.append(share(jobs, str(spec)))
        elif name == "static:searched":
            results.append(searched_static(jobs, model, gpus, knobs, run_static, finalists=finalists))
        else:
            policy = parse_policy(name, model, jobs=jobs, gpus=gpus, knobs=knobs)
            if policy.dynamic and warm:
                policy = dataclasses.replace(policy, layouts=warm[0])
            results.append(run_static(name, policy) if not policy.dynamic else run(name, policy))
    return results


def searched_static(
    jobs: Sequence[Job], model: str, gpus: int, knobs: Knobs, run: Callable[[str, Policy], SimResult], *, finalists: int = 3
) -> SimResult:
    """The best static mix in hindsight: `search_static`'s `finalists` best mixes and ``fitted``,
    each replayed by `run` (the real simulator); the lowest mean JCT among those that ran every job
    wins, named ``static:searched`` (its layouts are in `layouts_end`)."""
    fitted = fitted_layouts(jobs, model, gpus, knobs) if jobs else ()
    start = [tuple(fitted[i % len(fitted)] for i in range(gpus))] if fitted else []
    mixes = search_static(jobs, model, gpus=gpus, profiles=knobs.profiles, start=start, keep=finalists)
    for mix in start:
        if tuple(sorted(mix)) not in mixes:
            mixes.append(tuple(sorted(mix)))
    if not mixes:  # nothing serves every job: the whole GPU is the fallback
        mixes = [tuple(parse_policy("whole-gpu", model).layouts)]
    tried = [run("static:searched", Policy("static:searched", mix)) for mix in mixes]
    return min(tried, key=lambda r: (_jct(r) is None, _jct(r) or 0.0))


def _jct(result: SimResult | None) -> float | None:
    """Mean JCT of a policy that ran every job to the end, else None (a policy that rejects or
    strands jobs would look faster than it is)."""
    if result is None or result.rejected or result.unfinished:
        return None
    return result.summary()["jct_mean_s"] or None


def jct_floor(result: SimResult) -> float | None:
    """The mean JCT no policy can beat on `result`'s jobs: each job's own run time, as if no job
    ever waited and no re-carve cost anything (JCT is end minus arrival, `JobResult.jct_s`, and a
    job's parts all run its run time). Over the jobs that were not rejected; None if there are none."""
    ran = [j.duration_s for j in result.jobs if not j.rejected]
    return sum(ran) / len(ran) if ran else None


def ratios(results: Sequence[SimResult]) -> dict:
    """Dynamic's mean JCT over whole-GPU's and over the best static's, and dynamic's makespan over
    its lower bound; only policies that ran every job to the end count. None where one is missing.
    Also the floor over the searched static mix's mean JCT (`jct_floor`: the lowest ratio any
    policy could reach against it) and the share of that mix's mean JCT spent waiting."""
    by = {r.policy: r for r in results}
    dyn, whole = _jct(by.get("dynamic")), _jct(by.get("whole-gpu"))
    searched, sharing = _jct(by.get("static:searched")), _jct(by.get("sharing"))
    statics = [r for r in results if r.policy.startswith("static:") and _jct(r)]
    best = min(statics, key=lambda r: _jct(r), default=None)  # type: ignore[arg-type,return-value]
    d = by.get("dynamic")

    def over(x: float | None) -> float | None:
        return round(dyn / x, 4) if dyn and x else None

    floor = jct_floor(by["static:searched"]) if searched else None
    wait = by["static:searched"].summary()["wait_mean_s"] if searched else None

    return {
        "jct_ratio_vs_whole_gpu": over(whole),
        "jct_ratio_vs_best_static": over(_jct(best)),
        "best_static": best.policy if best else None,
        "jct_ratio_vs_best_searched_static": over(searched),
        "best_searched_static_layouts": by["static:searched"].layouts_end if searched else None,
        "jct_floor_vs_best_searched_static": round(floor / searched, 4) if floor and searched else None,
        "best_searched_static_wait_share": round(wait / searched, 4) if wait is not None and searched else None,
        "jct_ratio_vs_sharing": over(sharing),
        "jct_ratio_vs_proportional": over(_jct(by.get("proportional"))),
        "makespan_vs_lower_bound": round(d.makespan_s / d.lower_bound_s, 4) if dyn and d and d.lower_bound_s else None,
    }


def summary(results: Sequence[SimResult], **context) -> dict:
    """The JSON document of a comparison: context (trace, mapping, fleet...), ratios, per policy."""
    return {**context, **ratios(results), "policies": [r.summary() for r in results]}


def provenance(*, command: Sequence[str], seed: int | None, knobs: Knobs, trace: str | Path | None, **settings) -> dict:
    """What a run needs to be repeated exactly: the command line, the seed, the planner's knobs and
    the other settings, and the trace file's SHA-256 (None for a synthetic workload)."""
    checksum = None
    if trace is not None and Path(trace).is_file():
        checksum = hashlib.sha256(Path(trace).read_bytes()).hexdigest()
    knob_values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(knobs).items()}
    return {"command": shlex.join(command), "seed": seed, "knobs": knob_values, "trace_sha256": checksum, **settings}


def plot(results: Sequence[SimResult], path: str | Path, *, title: str = "") -> Path:
    """Compute leased over capacity for every policy, then for each policy the requests waiting
    per slice kind over time, into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + len(results), 1, figsize=(11, 2.2 * (1 + len(results)) + 1), sharex=True, squeeze=False)
    ax_use = axes[0][0]
    for r, (ax,) in zip(results, axes[1:]):
        t = [row[0] / 3600 for row in r.timeline]
        ax_use.step(t, [row[1] / r.capacity for row in r.timeline], where="post", label=r.policy, linewidth=1)
        for kind, rows in sorted(r.queue_by_kind.items()):
            ax.step([row[0] / 3600 for row in rows], [row[1] for row in rows], where="post", label=kind, linewidth=1)
        ax.set_ylabel("waiting")
        ax.set_title(f"{r.policy}: requests waiting per slice kind", fontsize=9)
        if r.queue_by_kind:
            ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax_use.set_ylabel("compute leased / capacity")
    ax_use.set_ylim(0, 1.05)
    ax_use.legend(fontsize=8, loc="upper right", ncol=2)
    axes[-1][0].set_xlabel("hours (virtual)")
    fig.suptitle(title or "prefect-mig simulation")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
