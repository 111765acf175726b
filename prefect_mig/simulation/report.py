"""Running several policies on one workload and fleet, and writing what they measured.

`compare` runs each policy on the same jobs and fleet (a fresh namespace each), `ratios` gives the
headline figures (dynamic against whole GPUs, against the best static layout that serves every job,
and the makespan against its lower bound), `plot` draws utilization and queue depth over time
into a PNG (matplotlib, headless), and `summary` is the JSON document.

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

from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from prefect_mig.errors import ConfigError
from prefect_mig.model import FleetSpec
from prefect_mig.repartition.planner import Knobs
from prefect_mig.simulation.engine import SimConfig, SimResult, Simulator
from prefect_mig.simulation.policies import parse_policy
from prefect_mig.simulation.workload import Job

DEFAULT_POLICIES = ("whole-gpu", "static:smallest", "static:mixed", "static:fitted", "dynamic")


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
) -> list[SimResult]:
    """Run every policy on the same jobs and fleet; `progress(policy, done, total)` as they go."""
    spec = FleetSpec.parse(fleet)
    model = fleet_model(spec)
    gpus = sum(len(node.gpus) for node in spec.nodes)
    results = []
    for name in policies:
        policy = parse_policy(name, model, jobs=jobs, gpus=gpus, knobs=knobs)
        config = SimConfig(fleet=str(spec), policy=policy, knobs=knobs, reconfig_cost_s=reconfig_cost_s)
        report = None if progress is None else (lambda done, total, n=name: progress(n, done, total))
        sub = Path(state_dir) / name.replace(":", "-").replace("@", "_").replace(" ", "")[:60]
        results.append(Simulator(client, jobs, config, state_dir=sub, progress=report).run())
    return results


def _jct(result: SimResult | None) -> float | None:
    """Mean JCT of a policy that ran every job to the end, else None (a policy that rejects or
    strands jobs would look faster than it is)."""
    if result is None or result.rejected or result.unfinished:
        return None
    return result.summary()["jct_mean_s"] or None


def ratios(results: Sequence[SimResult]) -> dict:
    """Dynamic's mean JCT over whole-GPU's and over the best static's, and dynamic's makespan over
    its lower bound; only policies that ran every job to the end count. None where one is missing."""
    by = {r.policy: r for r in results}
    dyn, whole = _jct(by.get("dynamic")), _jct(by.get("whole-gpu"))
    statics = [r for r in results if r.policy.startswith("static:") and _jct(r)]
    best = min(statics, key=lambda r: _jct(r), default=None)  # type: ignore[arg-type,return-value]
    d = by.get("dynamic")
    return {
        "jct_ratio_vs_whole_gpu": round(dyn / whole, 4) if dyn and whole else None,
        "jct_ratio_vs_best_static": round(dyn / _jct(best), 4) if dyn and best else None,
        "best_static": best.policy if best else None,
        "makespan_vs_lower_bound": round(d.makespan_s / d.lower_bound_s, 4) if dyn and d and d.lower_bound_s else None,
    }


def summary(results: Sequence[SimResult], **context) -> dict:
    """The JSON document of a comparison: context (trace, mapping, fleet...), ratios, per policy."""
    return {**context, **ratios(results), "policies": [r.summary() for r in results]}


def plot(results: Sequence[SimResult], path: str | Path, *, title: str = "") -> Path:
    """Utilization (leased and needed compute over capacity) and queue depth over time, one line
    per policy, into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_use, ax_queue) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in results:
        t = [row[0] / 3600 for row in r.timeline]
        ax_use.step(t, [row[1] / r.capacity for row in r.timeline], where="post", label=f"{r.policy} (leased)", linewidth=1)
        ax_queue.step(t, [row[3] for row in r.timeline], where="post", label=r.policy, linewidth=1)
    ax_use.set_ylabel("compute leased / capacity")
    ax_use.set_ylim(0, 1.05)
    ax_use.legend(fontsize=8, loc="upper right")
    ax_queue.set_ylabel("requests waiting")
    ax_queue.set_xlabel("hours (virtual)")
    ax_queue.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or "prefect-mig simulation")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
