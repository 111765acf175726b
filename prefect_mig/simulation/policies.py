"""The policies a simulation compares: whole GPUs, static MIG layouts, and dynamic repartitioning.

- ``whole-gpu``: no MIG; every GPU is one slice of its biggest profile and every job takes a whole
  GPU (what a counting concurrency limit or ``nvidia.com/gpu: 1`` gives).
- ``static:<name>``: a fixed layout that never changes. ``smallest`` carves every GPU into as many
  slices as the profiles allow (7x ``1g.10gb`` on an H100); ``mixed`` cycles the GPUs through four
  layouts from whole to smallest; ``fitted`` is the layout mix the planner picks for the whole
  workload's work per slice kind, in hindsight (the strongest static baseline); any layout text
  (``static:3g.40gb@0+3g.40gb@4``) carves every GPU that way.
- ``dynamic``: starts as ``mixed`` and lets the repartitioner (the live service's planner,
  against the queue and recent grants) re-carve as the demand moves.
- ``dynamic:mix`` (simulator only, an experiment): starts as ``mixed`` and follows the best static
  mix *of the recent past*: every ``MIX_EVERY`` grants (a fifth of that while requests wait, and
  whenever a queued kind has no slice in the mix) it searches the static mix that would have
  served the last ``MIX_HISTORY`` leases and waiting requests best (the search of
  ``static:searched``, on the workload the lease history shows: no hindsight), moves to it only
  when it scores ``MIX_HYSTERESIS`` better than the current one, and carves it GPU by GPU: changes
  that keep every busy slice at once, drains (which wait for their leases) on one GPU in four at
  a time, the GPUs and targets whose leases in the way are expected to end soonest first (see
  `prefect_mig.simulation.engine`).
- ``proportional``: a second, simpler dynamic anchor: starts as ``mixed`` and every
  ``PROPORTIONAL_PERIOD_S`` (virtual) drains every GPU toward the mix in proportion to the parts
  queued and running at that moment per slice kind (`mix_for`), ignoring what is busy. It is the
  periodic re-partitioning baseline of Klavik et al., "Energy Efficient Scheduling of AI/ML
  Workloads on Multi Instance GPUs with Dynamic Repartitioning" (arXiv:2606.25082, 2026), who
  re-partition twice a day; here the period is shorter and the mix follows the live demand.

Examples:
    ```python
    from prefect_mig.simulation.policies import parse_policy

    assert parse_policy("whole-gpu", "H100-80GB").layout_for(3) == "7g.80gb@0"
    p = parse_policy("static:smallest", "H100-80GB")
    assert p.layout_for(0).count("1g.10gb") == 7 and not p.dynamic
    assert parse_policy("dynamic", "H100-80GB").dynamic
    ```
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from prefect_mig.errors import ConfigError, PrefectMigError
from prefect_mig.model import Layout, enumerate_layouts, get_model
from prefect_mig.model.layout import select_profiles
from prefect_mig.repartition.planner import GpuState, Knobs, model_profiles, plan, slice_value
from prefect_mig.simulation.workload import Job, best_fit

STATIC_NAMES = ("smallest", "mixed", "fitted")
PROPORTIONAL_PERIOD_S = 1800.0
#: ``dynamic:mix`` (chosen a priori, not tuned): re-search the mix every MIX_EVERY grants over the last
#: MIX_HISTORY leases and requests, and move to a new mix only when it scores MIX_HYSTERESIS better
MIX_EVERY, MIX_HISTORY, MIX_HYSTERESIS, MIX_EVALS = 100, 300, 0.05, 150


@dataclass(frozen=True)
class Policy:
    """A name, the layouts GPUs start with (GPU i gets ``layouts[i % len]``), whether the
    repartitioner runs, and (``proportional``) the period of demand-proportional re-partitioning
    instead."""

    name: str
    layouts: tuple[str, ...]
    dynamic: bool = False
    period_s: float | None = None
    #: ``dynamic:mix``: re-search the static mix of the recent lease history every this many grants
    mix_every: int | None = None

    def layout_for(self, index: int) -> str:
        return self.layouts[index % len(self.layouts)]


def _biggest(model_name: str) -> str:
    model = get_model(model_name)
    p = max(model.classic_profiles, key=lambda p: (p.compute_slices, p.memory_mib))
    return f"{p.name}@0"


def layouts_of(model_name: str, profiles) -> list[Layout]:
    """The maximal layouts of `model_name` built from `profiles` (``extended`` per model)."""
    chosen = model_profiles(model_name, profiles)
    return enumerate_layouts(get_model(model_name), chosen if isinstance(chosen, str) else list(chosen))


def profile_names(model_name: str, profiles) -> list[str]:
    chosen = model_profiles(model_name, profiles)
    return [p.name for p in select_profiles(get_model(model_name), chosen if isinstance(chosen, str) else list(chosen))]


def _mixed(model_name: str, profiles) -> tuple[str, ...]:
    layouts = sorted(layouts_of(model_name, profiles), key=lambda l: (len(l.instances), str(l)))
    picks = [layouts[round(i * (len(layouts) - 1) / 3)] for i in range(4)]
    return tuple(dict.fromkeys(str(l) for l in picks))


def fitted_layouts(jobs: Sequence[Job], model_name: str, gpus: int, knobs: Knobs) -> tuple[str, ...]:
    """The static layout mix for `gpus` GPUs that serves the workload's work per slice kind best,
    as the planner sees it with the whole workload known in advance."""
    names = profile_names(model_name, knobs.profiles)
    work: dict[str, float] = defaultdict(float)
    for job in jobs:
        for part in job.parts:
            work[best_fit(part, model_name, names)] += job.duration_s
    return mix_for(work, model_name, gpus, knobs)


def mix_for(work: dict[str, float], model_name: str, gpus: int, knobs: Knobs) -> tuple[str, ...]:
    """The layouts of `gpus` GPUs whose slices are in proportion to `work` per slice kind (any
    unit), every kind held by some slice."""
    model = get_model(model_name)
    # slices of each kind the fleet keeps busy are in proportion to the kind's work (slice-seconds);
    # scaled so that they fill the fleet by each slice's dominant share (memory or compute: four
    # 1g.20gb fill an H100's memory while using four of its seven compute slices)
    used = sum(w * slice_value(model_name, k) for k, w in work.items()) or 1.0
    scale = gpus * model.compute_slices / used
    demand = {f"{model_name}/{k}": w * scale for k, w in work.items()}
    whole = Layout.parse(model_name, _biggest(model_name))
    states = [GpuState(gpu_uuid=f"gpu-{i:05d}", layout=whole) for i in range(gpus)]
    # the slices fill the fleet by their dominant shares (above), so the planner values them so too
    fitted = plan(
        states,
        demand,
        Knobs(churn_cost=0.0, fragmentation_cost=knobs.fragmentation_cost, profiles=knobs.profiles, value_by="dominant"),
    )
    layouts = [str(p.target) for p in fitted]
    # every job must fit somewhere: give the biggest kind a whole GPU if the mix left it out
    offered = {inst.profile for text in layouts for inst in Layout.parse(model_name, text).instances}
    needed = {kind for kind, w in work.items() if w > 0}
    if any(not mix_holds(kind, offered, model_name) for kind in needed) and layouts:
        layouts[-1] = _biggest(model_name)
    return tuple(layouts)


def mix_holds(kind: str, offered: set[str], model_name: str) -> bool:
    """Whether a slice of some offered profile is at least as big as `kind` (memory and compute)."""
    model = get_model(model_name)
    k = model.profile(kind)
    return any(
        (p := model.profile(o)).memory_mib >= k.memory_mib and p.compute_slices >= k.compute_slices for o in offered
    )


def parse_policy(
    text: str,
    model_name: str,
    *,
    jobs: Sequence[Job] = (),
    gpus: int = 1,
    knobs: Knobs = Knobs(),
) -> Policy:
    """A policy from its name: ``whole-gpu``, ``static:<smallest|mixed|fitted|layout>``, ``dynamic``,
    ``dynamic:mix``, ``proportional``.

    Raises:
        ConfigError: an unknown policy or an invalid layout (names what is allowed).
    """
    text = text.strip()
    if text == "whole-gpu":
        return Policy("whole-gpu", (_biggest(model_name),))
    if text == "dynamic":
        return Policy("dynamic", _mixed(model_name, knobs.profiles), dynamic=True)
    if text == "dynamic:mix":
        return Policy("dynamic:mix", _mixed(model_name, knobs.profiles), dynamic=True, mix_every=MIX_EVERY)
    if text == "proportional":
        return Policy("proportional", _mixed(model_name, knobs.profiles), dynamic=True, period_s=PROPORTIONAL_PERIOD_S)
    if text.startswith("static:"):
        name = text.split(":", 1)[1]
        if name == "smallest":
            layouts = layouts_of(model_name, knobs.profiles)
            model = get_model(model_name)  # the most instances, then the least memory: 7x 1g.10gb, not 6 and a 1g.20gb
            best = max(layouts, key=lambda l: (len(l.instances), -l.used_slices(model), str(l)))
            return Policy(text, (str(best),))
        if name == "mixed":
            return Policy(text, _mixed(model_name, knobs.profiles))
        if name == "fitted":
            return Policy(text, fitted_layouts(jobs, model_name, gpus, knobs))
        try:
            layout = Layout.parse(model_name, name.replace("+", " + ")).validate_on(get_model(model_name))
        except PrefectMigError as exc:
            raise ConfigError(
                f"policy: {text!r} is neither static:{'|'.join(STATIC_NAMES)} nor a valid {model_name} layout ({exc})."
            ) from exc
        return Policy(text, (str(layout),))
    raise ConfigError(
        f"policy: {text!r} is not a policy; choose whole-gpu, dynamic, dynamic:mix, static:smallest, static:mixed, "
        "static:fitted, static:<layout> (e.g. static:3g.40gb@0+3g.40gb@4), proportional, or, in a "
        "comparison, static:searched or sharing."
    )
