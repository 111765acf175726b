"""The repartitioning planner: pure code that turns (layouts, busy slices, demand) into a plan.

For each GPU it picks a target layout and the fewest create/destroy steps to reach it:

- **Never touches busy slices.** Every instance that is leased or has processes stays in the target
  layout, at the same place. Only idle ranges are re-carved (incremental).
- **Drain only when it pays.** A layout that would need busy slices gone is proposed as a *drain*
  plan (a range drain: the slices it replaces take no new grants and leave as their leases end,
  then it is applied) only when its gain over the best incremental layout exceeds ``drain_cost``
  per lease it must wait for, scaled by that lease's expected remaining run time (from the lease
  history, `GpuState.remaining_s`) over ``drain_reference_s`` (waiting for a lease that will run two
  more hours costs twelve times one that ends in ten minutes), plus the slice-time it withholds:
  what the slices it takes out of service would serve of the waiting demand meanwhile (its idle
  slices for the whole wait, and each busy one from its own lease's end until the last lease in the
  way ends: `drain_wait_s`, the expected wait for *all* of them). A drain plan carries a timeout in
  the same terms (``drain_timeout_factor`` x that expected wait).
- **Objective**, per GPU in turn (GPUs that already serve most demand first): most
  priority-weighted requests served (``Knobs.value_by="request"``, the default: each served
  request counts one, whatever its slice, as the mean job completion time counts every job once:
  a GPU that serves four waiting 1g.20gb requests ends four waits, one that serves a waiting 7g
  request ends one; a big request still comes first by its priority, a unit weighing
  ``1 + priority / 10``), then least churn (steps), then least fragmentation (free memory slices
  that no profile could use). With ``value_by="dominant"`` a served request counts its slice's
  dominant share of the GPU in compute slices instead (`slice_value`: a 7g request is worth seven
  1g.10gb ones); that kept whole GPUs for early 7g requests while hundreds of small ones queued
  behind them (``bench/scheduling.py`` at 16x). Demand a GPU serves is taken off what later GPUs
  see, so the fleet as a whole follows the demand rather than every GPU chasing the same profile.
- **Search.** Exact over the enumerated maximal layouts of the GPU's model (19 for the classic
  8-slice profiles, 78 with ``1g.20gb``) plus the current layout: those that keep every busy
  instance are incremental, the others drains. Enumerations are cached per model and profile set
  and compared as plain tuples, so a plan for 1,000 GPUs takes about 0.1 s.

Examples:
    ```python
    from prefect_mig.model import Layout, Placement
    from prefect_mig.repartition.planner import GpuState, plan

    ones = Layout.parse("H100-80GB", " + ".join(f"1g.10gb@{i}" for i in range(7)))
    busy = {Placement(profile="1g.10gb", start=s) for s in (4, 5, 6)}
    gpu = GpuState(gpu_uuid="GPU-0", layout=ones, busy=frozenset(busy))
    (p,) = plan([gpu], demand={"H100-80GB/3g.40gb": 1.0})
    assert str(p.target) == "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"
    assert p.kind == "incremental" and len(p.destroy) == 4 and len(p.create) == 1
    ```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from typing import Literal

from prefect_mig.errors import ConfigError
from prefect_mig.model import Layout, Placement, creatable, enumerate_layouts, free_slices, get_model
from prefect_mig.model.layout import select_profiles

PlanKind = Literal["none", "incremental", "drain"]
PROFILE_SETS = ("classic", "extended", "all")
VALUE_BY = ("request", "dominant")
#: how the service weighs recent grants while nothing waits (between pipeline runs): they are all
#: the demand there is, so each weighs what a queued request would (`Knobs.history_weight` only
#: ranks them below waiting requests); one recent 1g.20gb grant then re-carves an idle whole GPU
#: into 1g.20gb slices, as a waiting request would
BETWEEN_RUNS = {"history_weight": 1.0}


def profile_set(name: str, *, field: str = "profiles") -> str:
    """`Knobs.profiles` from what a user types: ``classic``, ``extended`` (each model's classic
    profiles plus its other profiles without media engines, e.g. ``1g.20gb`` on an H100; see
    `model_profiles`) or ``all``.

    Raises:
        ConfigError: any other name (names `field` and the allowed values).
    """
    if name not in PROFILE_SETS:
        raise ConfigError(f"{field}: {name!r} is not allowed; choose {', '.join(PROFILE_SETS)}.", field=field, value=name)
    return name


def value_by_choice(name: str, *, field: str = "value_by") -> str:
    """`Knobs.value_by` from what a user types: ``request`` or ``dominant``.

    Raises:
        ConfigError: any other name (names `field` and the allowed values).
    """
    if name not in VALUE_BY:
        raise ConfigError(f"{field}: {name!r} is not allowed; choose {', '.join(VALUE_BY)}.", field=field, value=name)
    return name


@lru_cache(maxsize=256)
def model_profiles(model_name: str, profiles: str | tuple[str, ...] = "extended") -> str | tuple[str, ...]:
    """`profiles` as `enumerate_layouts` takes them on `model_name`: ``extended`` becomes that
    model's own names (classic plus the 2-memory-slice ``1g`` profiles; no ``+me``), and a list of
    names keeps those the model has, so one profile set serves every model of a fleet.

    Examples:
        ```python
        from prefect_mig.repartition.planner import model_profiles

        assert "1g.20gb" in model_profiles("H100-80GB", "extended")
        assert "1g.10gb" in model_profiles("A100-40GB", "extended")  # A100-40GB's 2-slice 1g
        assert model_profiles("A30-24GB", "extended") == ("1g.6gb", "2g.12gb", "4g.24gb")
        ```
    """
    if profiles == "extended":
        return tuple(p.name for p in get_model(model_name).profiles if p.classic or not p.media_engines)
    if isinstance(profiles, str):
        return profiles
    model = get_model(model_name)
    return tuple(p for p in profiles if model.has_profile(p))


@dataclass(frozen=True)
class GpuState:
    """One GPU as the planner sees it: its current layout and which instances are busy."""

    gpu_uuid: str
    layout: Layout
    busy: frozenset[Placement] = frozenset()
    node: str = ""
    #: expected remaining run time (s) of busy instances' leases, where the lease history tells
    remaining_s: tuple[tuple[tuple[str, int], float], ...] = ()


@dataclass(frozen=True)
class GpuPlan:
    """What to do with one GPU. `destroy` then `create`, in that order; empty when nothing changes."""

    gpu_uuid: str
    kind: PlanKind
    current: Layout
    target: Layout
    destroy: tuple[Placement, ...] = ()
    create: tuple[Placement, ...] = ()
    served: float = 0.0
    node: str = ""
    drain_timeout_s: float | None = None  # for a drain: give up after this (None: the agent's own)

    @property
    def steps(self) -> int:
        return len(self.destroy) + len(self.create)


@dataclass(frozen=True)
class Knobs:
    """Policy knobs.

    Attributes:
        churn_cost: served requests (see `value_by`) one create or destroy step is worth (a re-carve takes
            ~1-2 s).
        drain_cost: served requests a drain must gain over the best incremental plan, per
            busy slice it waits for (its range serves nothing until those leases end) whose lease
            is expected to run `drain_reference_s` more; scaled by the expected remaining time
            (at least a tenth of it) where the lease history tells.
        drain_reference_s: the expected remaining run time `drain_cost` is priced at.
        drain_timeout_factor: a drain gives up after this many times the expected wait for every
            lease in its way to end (`drain_wait_s`; at least `drain_timeout_min_s`).
        drain_timeout_min_s: the shortest drain timeout the planner sets (a lease about to end
            still needs the agent to notice).
        fragmentation_cost: served requests one unusable free memory slice costs.
        profiles: the profiles layouts are built from: "classic", "extended" (the default; per model, see
            `model_profiles`), "all", or names.
        drains: whether plans may drain at all (the service turns them off while nothing waits).
        idle_window_s: while nothing waits, a slice freed less than this long ago counts as busy,
            so the layout changes between pipeline runs, not in the gaps between their steps.
        retry_after_s: a GPU whose last change was skipped (a drain outlived its timeout, a
            slice got leased) is left alone this long, so one drain does not repeat back to back.
        value_by: what one served request is worth: ``request`` (the default) one, whatever its
            slice; ``dominant`` its slice's dominant share of the GPU (`slice_value`).
        history_weight: a recent grant's weight as demand, relative to a queued request of the
            same priority: small enough that a GPU's worth of recent grants (seven 1g.10gb on an
            H100: 0.7) never outweighs one queued request (`DemandBook`).

    The defaults of `drain_cost` (2) and `drain_timeout_factor` (1) are the ones
    ``bench/scheduling.py`` measures: chosen on its tuning windows only (days 115, 125 and 135 at
    loads 4x-16x), never on the held-out windows its headline comes from. So were `value_by`
    ``request`` and `history_weight` 0.1 (the largest round weight at which seven recent grants
    weigh less than one queued request; at a quarter, day 125 at 8x starved its 7g requests).
    """

    churn_cost: float = 0.05
    drain_cost: float = 2.0
    drain_reference_s: float = 600.0
    drain_timeout_factor: float = 1.0
    drain_timeout_min_s: float = 60.0
    fragmentation_cost: float = 0.01
    profiles: str | tuple[str, ...] = "extended"
    drains: bool = True
    idle_window_s: float = 300.0
    retry_after_s: float = 600.0
    value_by: str = "request"
    history_weight: float = 0.1

    def __post_init__(self) -> None:
        value_by_choice(self.value_by)
        for name in ("churn_cost", "drain_cost", "drain_reference_s", "drain_timeout_factor", "drain_timeout_min_s",
                     "fragmentation_cost", "idle_window_s", "retry_after_s", "history_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r}: a knob must be a finite number, 0 or more.", field=name, value=value)


@lru_cache(maxsize=256)
def _candidates(model_name: str, profiles) -> tuple[Layout, ...]:
    chosen = model_profiles(model_name, profiles)
    return tuple(enumerate_layouts(get_model(model_name), chosen if isinstance(chosen, str) else list(chosen)))


@lru_cache(maxsize=256)
def _profile_names(model_name: str, profiles) -> frozenset[str]:
    chosen = model_profiles(model_name, profiles)
    return frozenset(p.name for p in select_profiles(get_model(model_name), chosen if isinstance(chosen, str) else list(chosen)))


def carvable(pkey: str, profiles: str | tuple[str, ...] = "extended") -> bool:
    """Whether layouts built from `profiles` can hold the slice kind ``"<model>/<profile>"``."""
    model_name, _, profile = pkey.partition("/")
    return profile in _profile_names(model_name, profiles)


@lru_cache(maxsize=4096)
def _fragmentation(layout: Layout) -> int:
    """Free memory slices no profile can use next to the layout's instances."""
    model = get_model(layout.gpu_model)
    free = set(free_slices(model, layout.instances))
    usable = {s for p in creatable(model, layout.instances, "all") for s in p.span(model)}
    return len(free - usable)


#: joins a node and a slice kind in a demand key that only that node's GPUs serve: requests
#: pinned to a node (``SliceRequest.node``) are ``"<node>|<model>/<profile>"``
PINNED = "|"


def pinned_key(node: str, pkey: str) -> str:
    """The demand key of a request for `pkey` that only `node` may serve."""
    return f"{node}{PINNED}{pkey}"


class Remaining:
    """Demand not yet served: per slice kind, unit weights best first (prefix sums, an offset).

    A float ``d`` is ``d`` units of weight 1 (the fraction as a last, lighter unit); a sequence
    lists each unit's weight (a queued high-priority request weighs more than a recent grant).
    Keys made by `pinned_key` are demand only the GPUs of that node serve: see `on`.
    """

    def __init__(self, demand: Mapping[str, float | Sequence[float]]) -> None:
        self.prefix: dict[str, list[float]] = {}
        self.offset: dict[str, int] = {}
        by_node: dict[str, dict[str, float | Sequence[float]]] = {}
        for key, value in demand.items():
            node, pinned, pkey = key.rpartition(PINNED)
            if pinned:
                by_node.setdefault(node, {})[pkey] = value
                continue
            if isinstance(value, (int, float)):
                whole = int(value)
                units = [1.0] * whole + ([value - whole] if value - whole > 1e-9 else [])
            else:
                units = sorted((float(u) for u in value if u > 0), reverse=True)
            if units:
                self.prefix[key] = list(accumulate(units, initial=0.0))
                self.offset[key] = 0
        self._pinned = {node: Remaining(own) for node, own in by_node.items()}

    def value(self, key: str, n: int) -> float:
        """The weight the best `n` remaining units of `key` add up to."""
        prefix = self.prefix.get(key)
        if prefix is None or n <= 0:
            return 0.0
        o = self.offset[key]
        return prefix[min(len(prefix) - 1, o + n)] - prefix[o]

    def take(self, key: str, n: int) -> None:
        if key in self.prefix:
            self.offset[key] = min(len(self.prefix[key]) - 1, self.offset[key] + n)

    def left(self, key: str) -> int:
        """How many units of `key` are not taken yet."""
        return len(self.prefix[key]) - 1 - self.offset[key] if key in self.prefix else 0

    def next_unit(self, key: str) -> float:
        """The weight of the best unit of `key` not taken yet (0 when none is left)."""
        return self.value(key, 1)

    def on(self, node: str) -> Remaining | _WithPinned:
        """The demand a GPU on `node` may serve: everyone's, and what is pinned to `node`."""
        own = self._pinned.get(node)
        return self if own is None else _WithPinned(self, own)


class _WithPinned:
    """`Remaining` as one node's GPUs see it: the shared demand merged with the node's pinned
    demand, best units first; `take` takes from whichever pool holds the better unit."""

    def __init__(self, shared: Remaining, own: Remaining) -> None:
        self.shared, self.own = shared, own

    def value(self, key: str, n: int) -> float:
        if n <= 0:
            return 0.0
        # both pools are sorted best first: the best n units are a prefix of each
        return max(self.shared.value(key, n - i) + self.own.value(key, i) for i in range(min(n, self.own.left(key)) + 1))

    def take(self, key: str, n: int) -> None:
        for _ in range(max(0, n)):
            shared, own = self.shared.next_unit(key), self.own.next_unit(key)
            if shared <= 0 and own <= 0:
                return
            (self.own if own > shared else self.shared).take(key, 1)


@dataclass(frozen=True)
class _Shape:
    """A layout reduced to what the search compares, on plain tuples (hashing pydantic models
    dominated the planner's time)."""

    layout: Layout
    text: str
    instances: frozenset[tuple[str, int]]
    counts: tuple[tuple[str, str, int, float], ...]  # (profile, pkey, instances, dominant share in compute slices)
    fragmentation: int


@lru_cache(maxsize=8192)
def _shape_of(text: str, layout: Layout) -> _Shape:
    model = get_model(layout.gpu_model)
    return _Shape(
        layout=layout,
        text=text,
        instances=frozenset((p.profile, p.start) for p in layout.instances),
        counts=tuple((name, f"{model.name}/{name}", n, slice_value(model.name, name)) for name, n in layout.profile_counts().items()),
        fragmentation=_fragmentation(layout),
    )


def _shape(layout: Layout) -> _Shape:
    return _shape_of(f"{layout.gpu_model}:{layout}", layout)


@lru_cache(maxsize=1024)
def slice_value(model_name: str, profile: str) -> float:
    """What serving one request on a `profile` slice is worth: its dominant share of the GPU
    (compute or memory, whichever is larger) in compute slices."""
    model = get_model(model_name)
    p = model.profile(profile)
    return max(p.compute_slices / model.compute_slices, p.memory_slices / model.memory_slices) * model.compute_slices


def request_value(model_name: str, profile: str, value_by: str = "request") -> float:
    """What serving one request on a `profile` slice adds to the planner's objective
    (`Knobs.value_by`): one, or the slice's dominant share (`slice_value`)."""
    return 1.0 if value_by == "request" else slice_value(model_name, profile)


@lru_cache(maxsize=256)
def _candidate_shapes(model_name: str, profiles) -> tuple[_Shape, ...]:
    return tuple(_shape(layout) for layout in _candidates(model_name, profiles))


def _served_shape(
    shape: _Shape, remaining: Remaining | _WithPinned, busy: frozenset[tuple[str, int]], value_by: str = "request"
) -> float:
    taken: dict[str, int] = {}
    for profile, start in busy:
        if (profile, start) in shape.instances:
            taken[profile] = taken.get(profile, 0) + 1
    served = 0.0
    for profile, pkey, n, value in shape.counts:
        served += remaining.value(pkey, n - taken.get(profile, 0)) * (1.0 if value_by == "request" else value)
    return served


def _served(
    layout: Layout, remaining: Remaining | _WithPinned, busy: frozenset[Placement] = frozenset(), value_by: str = "request"
) -> float:
    """Demand the layout's *idle* slices serve, weighted (`Knobs.value_by`): a busy slice serves
    nobody new."""
    return _served_shape(_shape(layout), remaining, frozenset((b.profile, b.start) for b in busy), value_by)


def _placements(items) -> tuple[Placement, ...]:
    return tuple(Placement(profile=p, start=s) for p, s in sorted(items, key=lambda x: x[1]))


def drain_wait_s(remaining_s: Sequence[float]) -> float:
    """Expected time until *every* lease in a drain's way has ended, from each one's expected
    remaining run time: the expected maximum of independent exponential run times with those
    means (inclusion-exclusion over the leases). One lease: its own expectation; k leases of mean
    m: m times the k-th harmonic number (four leases of 100 s: 208 s, not 100 s). Waiting for the
    longest *expectation* alone times drains out while the other leases still run.

    Examples:
        ```python
        from prefect_mig.repartition.planner import drain_wait_s

        assert drain_wait_s([]) == 0 and drain_wait_s([60.0]) == 60
        assert round(drain_wait_s([100.0] * 4), 1) == 208.3
        ```
    """
    return _drain_wait(tuple(sorted(remaining_s)))


@lru_cache(maxsize=4096)
def _drain_wait(remaining_s: tuple[float, ...]) -> float:
    rates = [1.0 / m for m in remaining_s if m > 0]
    if len(rates) > 10:  # 1,023 subsets at most; beyond that the harmonic form of the mean rate
        mean = len(rates) / sum(rates)
        return mean * sum(1.0 / k for k in range(1, len(rates) + 1))
    total = 0.0
    for mask in range(1, 1 << len(rates)):
        picked = [r for i, r in enumerate(rates) if mask >> i & 1]
        total += (-1) ** (len(picked) + 1) / sum(picked)
    return max([total, *(m for m in remaining_s if m <= 0)], default=0.0)


def plan_gpu(gpu: GpuState, remaining: Remaining | _WithPinned, knobs: Knobs = Knobs()) -> GpuPlan:
    """The best plan for one GPU against the demand not yet served elsewhere."""
    current = _shape(gpu.layout)
    # a busy slice the layout no longer lists (its GPU instance is gone; the lease ends soon)
    # holds nothing the planner could re-carve around
    busy = frozenset((b.profile, b.start) for b in gpu.busy) & current.instances
    expected = dict(gpu.remaining_s)

    def wait_cost(slices: frozenset[tuple[str, int]]) -> float:
        """drain_cost per lease in the way, scaled by its expected remaining run time."""
        return sum(
            knobs.drain_cost * (max(0.1, expected[s] / knobs.drain_reference_s) if s in expected else 1.0) for s in slices
        )

    model_name = current.layout.gpu_model

    def withheld(candidate: _Shape) -> float:
        """The slice-time a drain loses: the slices it takes out of service would serve waiting
        demand meanwhile. Its idle slices go out at once, for the whole wait; each busy slice in
        its way goes out when its own lease ends and stays out until the last one ends (the
        expected wait for all of them, `drain_wait_s`, less that lease's own). In units of
        `drain_reference_s`; the best waiting units of a kind go to the longest withheld slices."""
        in_way = busy - candidate.instances
        wait = drain_wait_s([expected.get(s, knobs.drain_reference_s) for s in in_way])
        idle: dict[str, int] = {}
        for profile, start in current.instances - candidate.instances - busy:
            idle[profile] = idle.get(profile, 0) + 1
        freed: dict[str, list[float]] = {}
        for profile, start in in_way:
            freed.setdefault(profile, []).append(wait - expected.get((profile, start), knobs.drain_reference_s))
        lost = 0.0
        for profile in idle.keys() | freed.keys():
            key, n = f"{model_name}/{profile}", idle.get(profile, 0)
            held = remaining.value(key, n) * wait  # idle slices are out longest: the best units
            for span in sorted(freed.get(profile, ()), reverse=True):
                held += (remaining.value(key, n + 1) - remaining.value(key, n)) * span
                n += 1
            lost += held * request_value(model_name, profile, knobs.value_by)
        return lost / knobs.drain_reference_s

    def score_of(candidate: _Shape) -> tuple[float, int]:
        steps = len(current.instances ^ candidate.instances)
        served = _served_shape(candidate, remaining, busy, knobs.value_by)
        return served - knobs.churn_cost * steps - knobs.fragmentation_cost * candidate.fragmentation, steps

    current_score, _ = score_of(current)  # keeping the layout: always allowed, never a drain
    best: tuple[_Shape, PlanKind, float] = (current, "none", current_score)
    best_key: tuple = (-current_score, 0, current.text)
    for candidate in _candidate_shapes(current.layout.gpu_model, knobs.profiles):
        score, steps = score_of(candidate)
        if busy <= candidate.instances:
            kind: PlanKind = "incremental"
        elif not knobs.drains:
            continue
        else:
            kind = "drain"
            score -= wait_cost(busy - candidate.instances)  # leases the drain must outlast
            if (-score, steps, candidate.text) >= best_key:
                continue  # what it withholds (never negative) can only make it worse
            score -= withheld(candidate)
        key = (-score, steps, candidate.text)  # deterministic: best score, fewer steps, the text
        if key < best_key:
            best_key, best = key, (candidate, kind, score)
    target, kind, best_score = best
    if target.instances == current.instances or best_score <= current_score:
        target, kind = current, "none"
    assert kind == "drain" or busy <= target.instances, "a plan may never destroy a busy slice"
    in_the_way = [expected[s] for s in busy - target.instances if s in expected]
    timeout = (
        max(knobs.drain_timeout_min_s, knobs.drain_timeout_factor * drain_wait_s(in_the_way))
        if kind == "drain" and in_the_way else None
    )
    return GpuPlan(
        gpu_uuid=gpu.gpu_uuid,
        kind=kind,
        current=gpu.layout,
        target=target.layout,
        destroy=_placements(current.instances - target.instances),
        create=_placements(target.instances - current.instances),
        served=_served_shape(target, remaining, busy, knobs.value_by),
        node=gpu.node,
        drain_timeout_s=timeout,
    )


def plan(
    gpus: Iterable[GpuState], demand: Mapping[str, float | Sequence[float]], knobs: Knobs = Knobs()
) -> list[GpuPlan]:
    """Plan every GPU against `demand` per ``"<model>/<profile>"``: a number of units of weight 1,
    or each unit's weight (see `Remaining`).

    GPUs whose current layout already serves the most demand are planned first, and the demand
    each plan's idle slices serve is taken off for the next GPU.
    """
    remaining = Remaining(demand)
    states = list(gpus)
    order = sorted(states, key=lambda g: (-_served(g.layout, remaining.on(g.node), g.busy, knobs.value_by), g.gpu_uuid))
    plans = {}
    for gpu in order:
        seen = remaining.on(gpu.node)
        p = plan_gpu(gpu, seen, knobs)
        plans[gpu.gpu_uuid] = p
        shape = _shape(p.target)
        busy = frozenset((b.profile, b.start) for b in gpu.busy)
        taken: dict[str, int] = {}
        for profile, start in busy & shape.instances:
            taken[profile] = taken.get(profile, 0) + 1
        for profile, pkey, n, _ in shape.counts:
            seen.take(pkey, n - taken.get(profile, 0))
    return [plans[g.gpu_uuid] for g in states]


@dataclass
class DemandBook:
    """Demand per slice kind from queued requests and recent grants, as unit weights for `plan`.

    A queued request is one unit of ``1 + priority / 10``. A recent grant is one unit of
    ``history_weight`` times that, so idle slices lean toward what was used lately while queued
    requests always come first: a GPU's worth of recent grants (seven 1g.10gb slices on an H100)
    weighs less than one queued request (at a quarter, seven recent 1g.10gb grants, 1.75,
    outweighed a waiting 7g request once each request counts one). A running lease is no demand:
    its slice is busy and stays.
    """

    history_weight: float = 0.1
    profiles: str | tuple[str, ...] = "extended"
    demand: dict[str, list[float]] = field(default_factory=dict)

    def _add(self, pkeys: Iterable[str], weight: float, node: str | None = None) -> None:
        """A request that accepts several kinds (best fit first) counts for the first kind the
        planner can carve: ``>=16gb`` lists ``1g.20gb`` first, which the classic profiles lack.
        One pinned to `node` counts only for that node's GPUs (`pinned_key`)."""
        pkeys = [k for k in pkeys if k]
        if pkeys:
            key = next((k for k in pkeys if carvable(k, self.profiles)), pkeys[0])
            self.demand.setdefault(pinned_key(node, key) if node else key, []).append(weight)

    def add_queued(self, pkeys: Iterable[str], priority: int, node: str | None = None) -> None:
        self._add(pkeys, 1 + priority / 10, node)

    def add_history(self, pkeys: Iterable[str] | str, priority: int) -> None:
        self._add([pkeys] if isinstance(pkeys, str) else pkeys, self.history_weight * (1 + priority / 10))
