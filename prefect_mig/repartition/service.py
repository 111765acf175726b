"""Reading what the planner needs from the allocator's inventory (the dry-run half of the service).

`plan_from_allocator` turns the live inventory into `GpuState`s (a slice that is leased, or that
the agent reported busy, is busy) and the wait queue plus recent grants into demand, then plans.
`desire` writes the plans that change something as desired layouts; each node's agent applies
its GPUs' (see `prefect_mig.agent`). `run_once` is one round of the service; `serve` runs rounds
as the allocator's events call for them (`trigger.Trigger`), at the latest every interval.

Examples:
    ```python
    from prefect_mig.allocator import Allocator
    from prefect_mig.repartition.service import plan_from_allocator
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("n=1xH100-80GB", layouts={"n": [" + ".join(f"1g.10gb@{i}" for i in range(7))]})
        plans = plan_from_allocator(alloc, extra_demand={"H100-80GB/3g.40gb": 1.0})
        assert "3g.40gb" in str(plans[0].target) and plans[0].kind == "incremental"
    ```
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.health import sweep_announced
from prefect_mig.errors import UnknownGpuModel
from prefect_mig.model import Layout, Placement, get_model
from prefect_mig.repartition.planner import BETWEEN_RUNS, DemandBook, GpuPlan, GpuState, Knobs, carvable, plan
from prefect_mig.repartition.trigger import Trigger

log = logging.getLogger("prefect_mig.repartition")


def gpu_states(
    status: dict, warm: set[str] | frozenset[str] = frozenset(), remaining: dict[str, float] | None = None
) -> list[GpuState]:
    """GPU states from `Allocator.status()`: layouts from the published slices, busy = leased (but
    not by an idle warm lease, which hands its slice over when asked) or unavailable (processes the
    agent saw, or a lost node), or listed in `warm` (recently released); `remaining` gives
    leased slices' expected remaining run time (see `expected_remaining`)."""
    remaining = remaining or {}
    # a warm lease's process is idle and hands its slice over when asked (allocator/warmth.py)
    kept_warm = {row.get("slice") for row in status.get("leases", []) if row.get("warm_at")}
    by_gpu: dict[str, list[dict]] = defaultdict(list)
    for s in status["slices"]:
        by_gpu[s["gpu_uuid"]].append(s)
    states = []
    for uuid, slices in sorted(by_gpu.items()):
        model = slices[0]["gpu_model"]
        placements = [Placement(profile=s["profile"], start=s["start"]) for s in slices if not s.get("gone")]
        busy = frozenset(
            Placement(profile=s["profile"], start=s["start"])
            for s in slices
            if (s["state"] in ("leased", "unavailable") and s["id"] not in kept_warm) or s["id"] in warm
        )
        left = tuple(((s["profile"], s["start"]), remaining[s["id"]]) for s in slices if s["id"] in remaining)
        states.append(GpuState(gpu_uuid=uuid, layout=Layout(gpu_model=model, instances=tuple(sorted(placements, key=lambda p: p.start))), busy=busy, node=slices[0]["node"], remaining_s=left))
    return states


def placeable(status: dict) -> list[dict]:
    """The queued requests some published node could serve: not those pinned to a node no agent
    published (queued while no node was published yet)."""
    nodes = status.get("nodes") or {}
    return [r for r in status["queue"] if not r.get("node") or r["node"] in nodes]


def demand_of(
    status: dict,
    events: list[dict],
    *,
    history: int | None = None,
    profiles: str | tuple[str, ...] = "extended",
    history_weight: float = Knobs.history_weight,
) -> dict[str, list[float]]:
    """Priority-weighted demand: every queued request, and the last `history` grants in `events`
    (oldest first; default: as many as the inventory has slices, so history can at most re-shape
    the fleet once), each weighing `history_weight` of a queued request. A request counts for the first kind it asked for that `profiles` carve.

    A queued request pinned to a node no agent published is no demand (no carve can serve it).
    One pinned to a published node is demand for that node's GPUs only (`planner.pinned_key`):
    a carve on another node would leave it waiting and the new slice idle."""
    book = DemandBook(profiles=profiles, history_weight=history_weight)
    history = len(status["slices"]) if history is None else history
    fleet = {s["gpu_model"] for s in status["slices"]}
    for r in placeable(status):
        # one queued before any node published wants the kinds of every catalog model: count it
        # for those of the models here, or a carve would be planned for a model the fleet lacks
        wants = [k for k in r.get("pkeys") or [] if k.split("/", 1)[0] in fleet] or r.get("pkeys") or []
        book.add_queued(wants, int(r.get("priority") or 0), node=r.get("node") or None)
    for e in [e for e in events if e.get("type") == "lease.granted"][-history:] if history else []:
        wants = [k for k in (e.get("wants") or "").split(",") if k] or [e.get("pkey", "")]
        book.add_history(wants, int(e.get("priority") or 0))
    return book.demand


def expected_remaining(status: dict, events: list[dict], *, now_ms: int) -> dict[str, float]:
    """Per leased slice: its lease's expected remaining run time in seconds, from the lease history
    in `events` (oldest first): the mean of ``d - age`` over the finished leases' durations ``d``
    longer than the lease's age (a lease older than every finished one: its age again). A lease
    granted before `events` begins is at least as old as the oldest event and is estimated at that
    age (not left to a flat default: such leases are the long ones). Empty without finished leases."""
    granted: dict[str, int] = {}
    durations: list[float] = []
    oldest = min((int(e.get("at") or 0) for e in events if e.get("at")), default=now_ms)
    for e in events:
        kind, lease = e.get("type"), e.get("lease")
        if kind == "lease.granted" and lease:
            granted[lease] = int(e.get("at") or 0)
        elif kind in ("lease.released", "lease.expired") and lease in granted:
            durations.append((int(e.get("at") or 0) - granted.pop(lease)) / 1000)
    if not durations:
        return {}
    out = {}
    for s in status["slices"]:
        if s["state"] == "leased" and s.get("lease"):
            age = (now_ms - granted.get(s["lease"], oldest)) / 1000
            longer = [d - age for d in durations if d > age]
            out[s["id"]] = sum(longer) / len(longer) if longer else age
    return out


def recent_leases(status: dict, events: list[dict], *, now_ms: int, profiles: str | tuple[str, ...] = "extended") -> list[tuple[float, float, str, int]]:
    """The demand history as a workload: per lease granted in `events` (oldest first) and per
    queued request, ``(arrival s, run time s, "<model>/<profile>", priority)``. A finished lease
    ran what it ran; a running one its age plus its expected remaining run time (see
    `expected_remaining`, else its age again); a queued request the mean finished run time. Times
    are relative to `now_ms`; the kind is the first one asked for that `profiles` carve."""
    granted: dict[str, tuple[float, str, int, int]] = {}
    rows: list[tuple[float, float, str, int]] = []
    durations: list[float] = []

    def kind(wants: list[str]) -> str:
        return first_carvable(wants, profiles)

    for e in events:
        t, lease = e.get("type"), e.get("lease")
        if t == "lease.granted" and lease:
            at = int(e.get("at") or 0)
            arrival = (at - int(e.get("waited_ms") or 0) - now_ms) / 1000
            wants = (e.get("wants") or "").split(",") or [e.get("pkey", "")]
            granted[lease] = (arrival, kind(wants or [e.get("pkey", "")]), int(e.get("priority") or 0), at)
        elif t in ("lease.released", "lease.expired", "lease.revoked") and lease in granted:
            arrival, pkey, priority, at = granted.pop(lease)
            run_s = (int(e.get("at") or 0) - at) / 1000
            durations.append(run_s)
            rows.append((arrival, (at - now_ms) / 1000 - arrival + run_s, pkey, priority))
    mean = sum(durations) / len(durations) if durations else 600.0
    for arrival, pkey, priority, at in granted.values():
        age = (now_ms - at) / 1000
        longer = [d - age for d in durations if d > age]
        left = sum(longer) / len(longer) if longer else max(age, 1.0)
        rows.append((arrival, (at - now_ms) / 1000 - arrival + age + left, pkey, priority))
    for r in placeable(status):
        enqueued = float(r.get("enqueued_at") or now_ms)
        rows.append(((enqueued - now_ms) / 1000, mean, kind(list(r.get("pkeys") or [])), int(r.get("priority") or 0)))
    return sorted(r for r in rows if r[2])


def first_carvable(pkeys, profiles: str | tuple[str, ...] = "extended") -> str:
    """The first of a request's kinds (best fit first) that `profiles` carve, else its first."""
    pkeys = [k for k in (pkeys.split(",") if isinstance(pkeys, str) else pkeys) if k]
    return next((k for k in pkeys if carvable(k, profiles)), pkeys[0] if pkeys else "")


def warm_slices(status: dict, events: list[dict], *, now_ms: int, window_s: float) -> set[str]:
    """Free slices whose last lease ended less than `window_s` ago (per `events`, oldest first)."""
    if window_s <= 0:
        return set()
    last: dict[str, tuple[str, int]] = {}
    for e in events:
        if e.get("type") in ("lease.granted", "lease.released", "lease.expired", "lease.revoked") and e.get("slice"):
            last[e["slice"]] = (e["type"], int(e.get("at") or 0))
    free = {s["id"] for s in status["slices"] if s["state"] == "free"}
    return {
        sid
        for sid, (kind, at) in last.items()
        if sid in free and kind != "lease.granted" and now_ms - at < window_s * 1000
    }


def plan_from_allocator(
    allocator: Allocator,
    *,
    knobs: Knobs = Knobs(),
    extra_demand: dict[str, float] | None = None,
    history: int | None = None,
    hold_back: bool = False,
) -> list[GpuPlan]:
    """Plan every GPU in the inventory against the live queue and recent grants (see `demand_of`).

    Idle windows: while requests wait, any idle range may be re-carved and drains are allowed.
    While nothing waits (between pipeline runs), only slices idle for `knobs.idle_window_s` are
    re-shaped toward recent demand (valued as `planner.BETWEEN_RUNS` says), and nothing is drained.

    With `hold_back`, GPUs the service must leave alone get no plan: one with a change still
    pending (one change at a time per GPU), and one whose last change was skipped less than
    `knobs.retry_after_s` ago (so a drain that timed out does not repeat back to back).
    """
    status = allocator.status()
    wanted = len(status["slices"]) if history is None else history
    # each lease adds queued, granted and released events, agents add layout events: read enough
    events = allocator.recent_events(max(200, wanted * 6, 6 * len(status["slices"])))
    warm: set[str] = set()
    if not status["queue"]:
        warm = warm_slices(status, events, now_ms=allocator.now_ms(), window_s=knobs.idle_window_s)
        knobs = replace(knobs, drains=False, **BETWEEN_RUNS)
    demand = demand_of(status, events, history=wanted, profiles=knobs.profiles, history_weight=knobs.history_weight)
    for k, v in (extra_demand or {}).items():
        demand.setdefault(k, []).extend([1.0] * int(v) + ([v - int(v)] if v - int(v) > 1e-9 else []))
    remaining = expected_remaining(status, events, now_ms=allocator.now_ms())
    plans = plan(_known_models_only(gpu_states(status, warm, remaining)), demand, knobs)
    if hold_back:
        held = {decode_key(k) for k in allocator.redis.hkeys(allocator.keys.desired)}
        now = allocator.now_ms()
        for e in events:
            if e.get("type") == "layout.skipped" and now - int(e.get("at") or 0) < knobs.retry_after_s * 1000:
                held.add(e.get("gpu", ""))
        plans = [p for p in plans if p.gpu_uuid not in held]
    return plans


def _known_models_only(states: list[GpuState]) -> list[GpuState]:
    """The GPUs whose model this process knows (the catalog, or published by their agent: `status`
    loads those); one of a model nobody published (an older agent) is left alone, with a warning."""
    known = []
    for state in states:
        try:
            get_model(state.layout.gpu_model)
        except UnknownGpuModel:
            log.warning("not planning GPU %s on %s: its model %r is neither in the catalog nor published by "
                        "its agent", state.gpu_uuid, state.node, state.layout.gpu_model)
            continue
        known.append(state)
    return known


def desire(allocator: Allocator, plans: list[GpuPlan]) -> list[GpuPlan]:
    """Write the plans that change something as desired layouts, a drain with the planner's
    timeout for it (`GpuPlan.drain_timeout_s`, which the agent applies); returns those plans."""
    changing = [p for p in plans if p.kind != "none" and p.steps]
    for p in changing:
        allocator.set_desired(p.gpu_uuid, str(p.target), kind=p.kind, drain_timeout_s=p.drain_timeout_s)
    return changing


def run_once(
    allocator: Allocator, *, knobs: Knobs = Knobs(), announce_s: float = 900.0, history: int | None = None
) -> list[GpuPlan]:
    """One round of the repartitioning service: announce itself for `announce_s` (so requests may
    wait for kinds it will carve), plan against the live demand, desire the changes of the GPUs
    it need not leave alone (see `plan_from_allocator`'s `hold_back`)."""
    allocator.announce_repartitioner(announce_s)
    return desire(allocator, plan_from_allocator(allocator, knobs=knobs, history=history, hold_back=True))


def serve(
    allocator: Allocator,
    *,
    knobs: Knobs = Knobs(),
    interval_s: float = 30.0,
    stop: threading.Event | None = None,
    trigger: Trigger | None = None,
    on_plan: Callable[[GpuPlan], None] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> None:
    """The service's loop until `stop`: a round (`run_once`) now, then one on each `trigger` (the
    allocator's events: a lease ended, a request queued, ...; see `Trigger`), at the latest every
    `interval_s`; after a triggered round it rests as long as the round took, so constant churn
    keeps it planning at most half the time. `on_plan` is called with each change desired. With `on_event` (an emitter of
    Prefect events), each round also sweeps and passes on the lease expiries and silent agents it
    takes (`health.sweep_announced`), so a cluster whose agents died still says so."""
    trigger = trigger or Trigger(allocator)
    while not (stop is not None and stop.is_set()):
        if on_event is not None:
            for kind, fields in sweep_announced(allocator):
                try:
                    on_event(kind, fields)
                except Exception as exc:  # noqa: BLE001 - a notification never stops the service
                    log.warning("on_event(%s) failed: %s", kind, exc)
        began = time.monotonic()
        for p in run_once(allocator, knobs=knobs, announce_s=3 * interval_s):
            if on_plan is not None:
                on_plan(p)
        took = time.monotonic() - began
        why = trigger.wait(interval_s, stop)
        if why is not None:
            log.info("planning now: %s", why)
            # under constant churn, plan at most half the time (a big inventory's round takes a while)
            (stop or threading.Event()).wait(took)


def decode_key(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
