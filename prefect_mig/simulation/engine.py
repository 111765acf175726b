"""The simulator: discrete events on a virtual clock, over the real allocator, planner and agent.

Nothing here is a second model of prefect-mig. Every grant, hand-off and release is the allocator's
Lua on a real Redis (with a `ManualClock`, so waits, aging and expiries follow virtual time); every
re-carve is the repartitioning service's `run_once` (the real planner) followed by each node's
`NodeAgent` applying it through the `GpuBackend` on the simulated NVML. The simulator only decides
*when* things happen: a job arrives, its parts get slices (read back from the allocator's event
stream), each part holds its slice for the job's run time and releases it. At the end the event
stream is replayed through the allocator's invariant checker (`SimResult.violations`).

Timing model, stated once:

- A part runs for its job's run time on any slice that satisfies it (no speedup on bigger slices).
- The service plans every `plan_interval_s` while something changed: while requests wait, and
  (`plan_while_idle`) while none do, as the live service does between pipeline runs. Then it only
  re-shapes slices idle for the planner's ``idle_window_s`` toward the recent grants and drains
  nothing (`prefect_mig.repartition.service.plan_from_allocator`), so GPUs left idle by a
  compute-heavy start are re-carved for the small requests arriving before those take whole GPUs.
- A re-carve takes `reconfig_cost_s`: the agent takes the doomed slices out of service when the
  change is desired (a range drain waits for their leases to end first) and the new slices come
  into service `reconfig_cost_s` later. The rest of the GPU keeps working meanwhile.
- Leases live 24 h and are renewed every 12 h (virtual), so no lease expires under a running job.
- Preemption is off and node heartbeats never lapse: the simulation measures placement, order and
  layouts, not failures.

Examples:
    ```python
    import tempfile
    from prefect_mig.simulation.engine import SimConfig, Simulator
    from prefect_mig.simulation.policies import parse_policy
    from prefect_mig.simulation.workload import Job
    from prefect_mig.testing.redis_server import RedisServer

    jobs = [Job("a", 0, 100, ((10, 1),)), Job("b", 0, 100, ((10, 1),))]
    with RedisServer() as server:
        config = SimConfig(fleet="n=1xH100-80GB", policy=parse_policy("whole-gpu", "H100-80GB"))
        result = Simulator(server.client(), jobs, config, state_dir=tempfile.mkdtemp()).run()
    assert result.makespan_s == 200  # one whole GPU: the second job waits for the first
    ```
"""

from __future__ import annotations

import heapq
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, ManualClock, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.allocator.models import decode
from prefect_mig.errors import ConfigError, Unsatisfiable
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import FleetSpec, Layout, get_model
from prefect_mig.repartition import service
from prefect_mig.repartition.planner import Knobs
from prefect_mig.simulation.policies import MIX_EVALS, MIX_HISTORY, MIX_HYSTERESIS, Policy, mix_for, mix_holds, profile_names
from prefect_mig.simulation.workload import Job, best_fit

T0_MS = 1_700_000_000_000
LEASE_TTL_S = 86_400.0
MIX_DRAIN_TIMEOUT_S = 30 * 86_400.0  # dynamic:mix's drains wait for their leases
RENEW_EVERY_S = 43_200.0


@dataclass(frozen=True)
class SimConfig:
    """One simulation: the fleet, the policy and the timing knobs.

    Attributes:
        fleet: a fleet spec, e.g. ``sim-0=8xH100-80GB,sim-1=8xH100-80GB``.
        policy: see `prefect_mig.simulation.policies`.
        knobs: the planner's knobs (profiles it carves, drain and churn costs).
        reconfig_cost_s: seconds a re-carved range is out of service (mig.md: ~2-6 s measured by
            others; the default adds the agent's polling).
        plan_interval_s: how often the service plans while something changed.
        plan_while_idle: the service also plans while no request waits (the live service's
            rounds); False plans only while requests wait (what the benchmark measured before).
        drain_timeout_s: a range drain whose leases outlive this is given up (the agent's default).
        aging_s: waiting this long is worth one priority level (the allocator's aging).
        history: recent grants the planner weighs next to the queue (default: one per slice).
    """

    fleet: str
    policy: Policy
    knobs: Knobs = Knobs()
    reconfig_cost_s: float = 10.0
    plan_interval_s: float = 60.0
    drain_timeout_s: float = 600.0
    aging_s: float = 600.0
    history: int | None = None
    plan_while_idle: bool = True


@dataclass
class JobResult:
    name: str
    qos: str
    priority: int
    arrival_s: float
    duration_s: float
    start_s: float | None = None  # when its last part got a slice
    end_s: float | None = None
    parts_left: int = 0  # parts not granted yet
    rejected: bool = False  # no slice in the fleet can hold it

    @property
    def wait_s(self) -> float:
        return (self.start_s or 0.0) - self.arrival_s

    @property
    def jct_s(self) -> float:
        return (self.end_s or 0.0) - self.arrival_s


@dataclass
class SimResult:
    """What a run measured. `timeline` rows: (t, compute slices leased, compute slices the running
    jobs need, requests waiting)."""

    policy: str
    fleet: str
    capacity: int  # compute slices in the fleet
    jobs: list[JobResult]
    rejected: list[str]
    unfinished: list[str]
    timeline: list[tuple[float, int, int, int]]
    reconfigurations: int
    range_drains: int
    skipped_changes: int
    lower_bound_s: float
    wall_s: float = 0.0
    layouts_end: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # the allocator's invariants, replayed
    #: requests waiting per slice kind (the smallest profile that holds them): (t, count) rows
    queue_by_kind: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    @property
    def finished(self) -> list[JobResult]:
        return [j for j in self.jobs if j.end_s is not None]

    @property
    def makespan_s(self) -> float:
        return max((j.end_s for j in self.finished), default=0.0)

    def utilization(self) -> tuple[float, float]:
        """Time-averaged (leased, needed) compute over capacity, from 0 to the makespan."""
        span = self.makespan_s
        if not span or not self.capacity:
            return 0.0, 0.0
        leased = needed = 0.0
        for (t, a, n, _), (t2, *_rest) in zip(self.timeline, self.timeline[1:] + [(span, 0, 0, 0)]):
            leased += a * (min(t2, span) - t)
            needed += n * (min(t2, span) - t)
        return leased / (self.capacity * span), needed / (self.capacity * span)

    def summary(self) -> dict:
        """JSON-ready figures: JCT and wait (mean, p50, p95) overall and per priority class, over
        the jobs that finished (see `rejected` and `unfinished` for the others)."""
        done = self.finished

        def stats(rows: Sequence[JobResult]) -> dict:
            jct = sorted(r.jct_s for r in rows)
            wait = sorted(r.wait_s for r in rows)
            return {
                "jobs": len(rows),
                "jct_mean_s": round(sum(jct) / len(jct), 2) if jct else None,
                "jct_p50_s": _pct(jct, 50),
                "jct_p95_s": _pct(jct, 95),
                "wait_mean_s": round(sum(wait) / len(wait), 2) if wait else None,
                "wait_p95_s": _pct(wait, 95),
            }

        leased, needed = self.utilization()
        return {
            "policy": self.policy,
            "fleet": self.fleet,
            "capacity_compute_slices": self.capacity,
            **stats(done),
            "by_priority": {str(p): stats([r for r in done if r.priority == p]) for p in sorted({r.priority for r in done})},
            "makespan_s": round(self.makespan_s, 2),
            "makespan_lower_bound_s": round(self.lower_bound_s, 2),
            "makespan_vs_lower_bound": round(self.makespan_s / self.lower_bound_s, 4) if self.lower_bound_s else None,
            "utilization_leased": round(leased, 4),
            "utilization_needed": round(needed, 4),
            "reconfigurations": self.reconfigurations,
            "range_drains": self.range_drains,
            "skipped_changes": self.skipped_changes,
            "rejected": len(self.rejected),
            "rejection_rate": round(len(self.rejected) / len(self.jobs), 4) if self.jobs else 0.0,
            "unfinished": len(self.unfinished),
            "invariant_violations": len(self.violations),
            "wall_s": round(self.wall_s, 2),
        }


def _pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    return round(values[max(0, math.ceil(len(values) * p / 100) - 1)], 2)  # nearest rank


def lower_bound(jobs: Sequence[Job], capacity: int, memory_gb: float = 0.0) -> float:
    """No schedule finishes before all compute-slice work fits the compute capacity, nor before
    all memory work (GB x seconds) fits the fleet's memory (`memory_gb`, when given), nor before a
    job that arrives late and runs long could finish."""
    work = sum(j.work() for j in jobs) / capacity if capacity else 0.0
    memory = sum(j.memory_work() for j in jobs) / memory_gb if memory_gb else 0.0
    return max([work, memory] + [j.arrival_s + j.duration_s for j in jobs])


def fleet_capacity(fleet: FleetSpec) -> tuple[int, float]:
    """Compute slices and memory GB (the biggest profile's, as jobs count it) of a fleet."""
    compute = memory = 0.0
    for node in fleet.nodes:
        for m in node.gpus:
            biggest = max(get_model(m).profiles, key=lambda p: (p.compute_slices, p.memory_mib))
            compute += biggest.compute_slices
            memory += biggest.memory_gb
    return int(compute), memory


def queue_kind(need: tuple[float, int], fleet: FleetSpec) -> str:
    """The slice kind a need waits as: the smallest profile of the fleet's first model holding it."""
    try:
        return best_fit(need, fleet.nodes[0].gpus[0])
    except ConfigError:
        return f"{need[0]:g}gb/{need[1]}c"


@dataclass
class _Part:
    job: int
    request_id: str
    duration_s: float
    need_compute: int
    kind: str = ""
    fence: int = 0
    compute: int = 0
    gpu: str = ""


class Simulator:
    """Runs `jobs` on a fleet under a policy, on the allocator in `client` (a private namespace,
    deleted afterwards).

    Args:
        client: a Redis client (a real server).
        jobs: the workload (`prefect_mig.simulation.workload`).
        config: fleet, policy, knobs.
        state_dir: where the simulated NVML keeps its state.
        progress: called as ``progress(jobs done, jobs total)`` while it runs.
    """

    def __init__(
        self,
        client: redis.Redis,
        jobs: Sequence[Job],
        config: SimConfig,
        *,
        state_dir: str | Path,
        progress: Callable[[int, int], None] | None = None,
        max_virtual_s: float | None = None,
    ) -> None:
        self.client = client
        self.jobs = list(jobs)
        self.config = config
        self.state_dir = Path(state_dir)
        self.progress = progress
        self.fleet = FleetSpec.parse(config.fleet)
        self.capacity, self.memory_gb = fleet_capacity(self.fleet)
        self.lower_bound_s = lower_bound(self.jobs, self.capacity, self.memory_gb)
        self.max_virtual_s = max_virtual_s or 100 * max(self.lower_bound_s, 1.0)
        self.clock = ManualClock(start_ms=T0_MS)
        self.namespace = "sim-" + uuid.uuid4().hex[:12]
        self.allocator = Allocator(
            client,
            self.namespace,
            clock=self.clock,
            aging_s=config.aging_s,
            wait_ttl_s=10**8,
            grace_s=None,
            queue_uncarved=config.policy.dynamic,
            max_ttl_s=86_400,  # simulated jobs hold their slice for their whole (virtual) run
            claim_s=None,  # grants are read from the events, nobody claims them
        )
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._last_event = "0-0"
        self._parts: dict[str, _Part] = {}
        self._slices: dict[str, tuple[str, int]] = {}
        self._gpus: dict[str, tuple[NodeAgent, int]] = {}
        self._draining: set[str] = set()
        self._reconfiguring: set[str] = set()
        self._results = [JobResult(j.name, j.qos, j.priority, j.arrival_s, j.duration_s, parts_left=len(j.parts)) for j in self.jobs]
        self._open = [len(j.parts) for j in self.jobs]  # parts not yet finished, per job
        self._rejected: list[str] = []
        self._leased = self._needed = self._waiting = 0
        self._timeline: list[tuple[float, int, int, int]] = [(0.0, 0, 0, 0)]
        self._dirty = False
        self._done = 0
        self._counts = {"applied": 0, "drains": 0, "skipped": 0}
        self._backends: list[GpuBackend] = []
        self._queue_by_kind: dict[str, list[tuple[float, int]]] = {}
        self._next_period = 0.0  # the proportional policy's next re-partitioning
        self._mix: tuple[str, ...] | None = None  # dynamic:mix's current static mix
        self._grants_since_mix = 0

    # ------------------------------------------------------------------ plumbing

    @property
    def now(self) -> float:
        return (self.clock.now_ms() - T0_MS) / 1000

    def _at(self, t: float, kind: str, data: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, data))

    def _queue_kind(self, kind: str, delta: int) -> None:
        rows = self._queue_by_kind.setdefault(kind, [(0.0, 0)])
        row = (self.now, rows[-1][1] + delta)
        if rows[-1][0] == row[0]:
            rows[-1] = row
        else:
            rows.append(row)

    def _mark(self) -> None:
        row = (self.now, self._leased, self._needed, self._waiting)
        if self._timeline[-1][0] == row[0]:
            self._timeline[-1] = row
        else:
            self._timeline.append(row)

    def _setup(self) -> None:
        index = 0
        for node in self.fleet.nodes:
            nvml = SimulatedNvml(self.fleet, node=node.name, state_dir=self.state_dir)
            backend = GpuBackend(nvml).open()
            self._backends.append(backend)
            for i, model_name in enumerate(node.gpus):
                backend.apply_layout(i, Layout.parse(model_name, self.config.policy.layout_for(index)))
                index += 1
            agent = NodeAgent(
                backend,
                self.allocator,
                node=node.name,
                heartbeat_ttl_s=10**9,
                drain_timeout_s=self.config.drain_timeout_s,
                clock=lambda: self.now,
            )
            for i in range(len(node.gpus)):
                self._gpus[backend.gpu(i).uuid] = (agent, i)
            agent.publish()
        self._read_events()

    def _teardown(self) -> None:
        for backend in self._backends:
            backend.close()
        keys = list(self.client.scan_iter(match=f"{self.allocator.keys.prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            self.client.delete(*keys[i : i + 500])

    def _slice(self, slice_id: str) -> tuple[str, int]:
        if slice_id not in self._slices:
            raw = json.loads(decode(self.client.hget(self.allocator.keys.slices, slice_id)))
            self._slices[slice_id] = (raw["gpu_uuid"], int(raw["compute_slices"]))
        return self._slices[slice_id]

    def _read_events(self) -> None:
        """Learn what the scripts did: grants (direct or handed off) and applied layouts."""
        while True:
            entries = self.client.xrange(self.allocator.keys.events, min="(" + self._last_event, count=5000)
            if not entries:
                return
            for eid, fields in entries:
                self._last_event = decode(eid)
                e = {decode(a): decode(b) for a, b in fields.items()}
                kind = e.get("type")
                if kind == "lease.granted" and e["lease"] in self._parts:
                    self._granted(self._parts[e["lease"]], int(e["fence"]), e["slice"])
                elif kind == "layout.applied" and e.get("detail") != "already in place":
                    self._counts["applied"] += 1
                elif kind == "layout.skipped":
                    self._counts["skipped"] += 1

    # ------------------------------------------------------------------ transitions

    def _granted(self, part: _Part, fence: int, slice_id: str) -> None:
        part.fence = fence
        part.gpu, part.compute = self._slice(slice_id)
        self._waiting -= 1
        self._queue_kind(part.kind, -1)
        self._leased += part.compute
        self._needed += part.need_compute
        result = self._results[part.job]
        result.parts_left -= 1
        self._grants_since_mix += 1
        if result.parts_left == 0:
            result.start_s = self.now
        self._at(self.now + part.duration_s, "done", part.request_id)
        if part.duration_s > LEASE_TTL_S - 60:
            self._at(self.now + RENEW_EVERY_S, "renew", part.request_id)
        self._dirty = True
        self._mark()

    def _arrive(self, index: int) -> None:
        job = self.jobs[index]
        self._dirty = True
        for n, (memory_gb, compute) in enumerate(job.parts):
            rid = f"{index}.{n}"
            part = _Part(index, rid, job.duration_s, compute, kind=queue_kind((memory_gb, compute), self.fleet))
            request = SliceRequest(
                min_memory_gb=memory_gb,
                min_compute_slices=compute,
                priority=job.priority,
                tenant=job.qos or "default",
                holder=job.name,
                ttl_s=LEASE_TTL_S,
            )
            self._parts[rid] = part
            self._waiting += 1
            self._queue_kind(part.kind, +1)
            try:
                self.allocator.try_acquire(request, wait=True, request_id=rid)
            except Unsatisfiable:
                self._waiting -= 1
                self._queue_kind(part.kind, -1)
                del self._parts[rid]
                for m in range(n):  # parts already queued or granted give way
                    other = self._parts.pop(f"{index}.{m}")
                    if other.fence:
                        self.allocator.release(other.request_id, other.fence)
                        self._leased -= other.compute
                        self._needed -= other.need_compute
                    else:
                        self.allocator.cancel(other.request_id)
                        self._waiting -= 1
                        self._queue_kind(other.kind, -1)
                    self._read_events()  # a release may hand the slice to a waiter now
                self._rejected.append(job.name)
                self._results[index].rejected = True
                self._done += 1
                break
            self._read_events()
        self._mark()

    def _finish_part(self, rid: str) -> None:
        part = self._parts.pop(rid, None)
        if part is None:
            return
        self.allocator.release(rid, part.fence)
        self._leased -= part.compute
        self._needed -= part.need_compute
        self._dirty = True
        result = self._results[part.job]
        self._open[part.job] -= 1
        if self._open[part.job] == 0:
            result.end_s = self.now
            self._done += 1
            if self.progress:
                self.progress(self._done, len(self.jobs))
        self._read_events()
        if part.gpu in self._draining:
            self._begin(part.gpu)
        self._mark()

    def _begin(self, gpu: str) -> None:
        agent, index = self._gpus[gpu]
        began = agent.begin_desired(index, gpu)
        if began == "draining":
            if gpu not in self._draining:
                self._counts["drains"] += 1
            self._draining.add(gpu)
            return
        self._draining.discard(gpu)
        if began == "ready":
            self._reconfiguring.add(gpu)
            self._at(self.now + self.config.reconfig_cost_s, "carve", gpu)
        self._read_events()

    def _carve(self, gpu: str) -> None:
        agent, index = self._gpus[gpu]
        self._reconfiguring.discard(gpu)
        agent.finish_desired(index, gpu)
        self._slices.clear()
        self._read_events()
        self._mark()

    def _proportional(self) -> None:
        """The periodic demand-proportional anchor (`policies`): drain every GPU toward the mix
        in proportion to the parts queued and running now, per slice kind."""
        model = self.fleet.nodes[0].gpus[0]
        names = profile_names(model, self.config.knobs.profiles)
        work: dict[str, float] = {}
        for rid, part in self._parts.items():
            kind = best_fit(self.jobs[part.job].parts[int(rid.split(".")[1])], model, names)
            work[kind] = work.get(kind, 0.0) + 1.0
        targets = list(mix_for(work, model, len(self._gpus), self.config.knobs))
        current = {gpu: str(agent.backend.layout(i)) for gpu, (agent, i) in self._gpus.items()}
        changing = []
        for gpu, layout in sorted(current.items()):
            if layout in targets:
                targets.remove(layout)
            else:
                changing.append(gpu)
        for gpu, target in zip(changing, targets):
            self.allocator.set_desired(gpu, target, kind="drain")
            self._begin(gpu)

    def _mix_track(self) -> None:
        """The ``dynamic:mix`` policy (`policies`): follow the best static mix of the recent lease
        history, with hysteresis, carving it without hindsight (what the service can see)."""
        from prefect_mig.simulation.baselines import quick_static, search_static  # baselines import this module

        policy, knobs = self.config.policy, self.config.knobs
        self.allocator.announce_repartitioner(10**6)
        status = self.allocator.status()
        model = get_model(self.fleet.nodes[0].gpus[0])
        n = len(self._gpus)
        if self._mix is None:
            self._mix = tuple(sorted(policy.layout_for(i) for i in range(n)))
        offered = {inst.profile for text in set(self._mix) for inst in Layout.parse(model.name, text).instances}
        unheld = any(
            not mix_holds(k.partition("/")[2], offered, model.name)
            for r in status["queue"] for k in [service.first_carvable(r.get("pkeys") or [], knobs.profiles)] if k
        )
        events = None
        every = policy.mix_every or 0
        # sooner while requests wait: a queue is the sign the mix no longer fits the demand
        if unheld or self._grants_since_mix >= (every // 5 if status["queue"] else every):
            self._grants_since_mix = 0
            events = self.allocator.recent_events(8 * MIX_HISTORY)
            rows = service.recent_leases(status, events, now_ms=self.allocator.now_ms(), profiles=knobs.profiles)
            rows = rows[-MIX_HISTORY:]
            jobs = []
            for i, (arrival, run_s, pkey, priority) in enumerate(rows):
                p = model.profile(pkey.partition("/")[2])
                jobs.append(Job(f"h{i}", arrival - rows[0][0], max(run_s, 1.0), ((float(p.memory_gb), p.compute_slices),), priority))
            if jobs:
                found = search_static(jobs, model.name, gpus=n, profiles=knobs.profiles, start=[self._mix], keep=1, max_evals=MIX_EVALS)
                if found:
                    now_score = quick_static(jobs, model.name, self._mix)
                    new_score = quick_static(jobs, model.name, found[0])
                    if now_score is None or (new_score is not None and new_score < (1 - MIX_HYSTERESIS) * now_score):
                        self._mix = found[0]
        # carve the mix: GPUs already in it stay; the others take the layouts left over
        by_gpu: dict[str, list[str]] = {}
        for sl in status["slices"]:
            if not sl.get("gone"):
                by_gpu.setdefault(sl["gpu_uuid"], []).append(f"{sl['profile']}@{sl['start']}")
        if sorted(" + ".join(sorted(v, key=lambda x: int(x.split("@")[1]))) for v in by_gpu.values()) == sorted(self._mix):
            return  # the fleet is carved as the mix
        events = events if events is not None else self.allocator.recent_events(max(200, 6 * len(status["slices"])))
        remaining = service.expected_remaining(status, events, now_ms=self.allocator.now_ms())
        states = service.gpu_states(status, remaining=remaining)
        left = list(self._mix)
        moving = []
        for state in states:
            desired = self.allocator.desired(state.gpu_uuid)
            text = desired["layout"] if desired else str(state.layout)
            if text in left:
                left.remove(text)
            elif not desired:
                moving.append(state)
        draining = len(self._draining)
        # soonest free first: no busy slice, then by the longest expected remaining run time in the way
        moving.sort(key=lambda g: (max((t for _, t in g.remaining_s), default=0.0) if g.busy else -1.0, len(g.busy), g.gpu_uuid))
        for state in moving:
            if not left:
                break
            busy = {(b.profile, b.start) for b in state.busy}
            expected = dict(state.remaining_s)

            def cost(text: str) -> tuple[float, int, str]:
                """Expected lease-seconds the change waits for, then steps: the cheapest target."""
                inst = {(p.profile, p.start) for p in Layout.parse(model.name, text).instances}
                wait = sum(expected.get(b, knobs.drain_reference_s) for b in busy - inst)
                return wait, len(inst ^ {(p.profile, p.start) for p in state.layout.instances}), text

            target = min(left, key=cost)
            in_way = [expected.get(b, knobs.drain_reference_s) for b in busy - {(p.profile, p.start) for p in Layout.parse(model.name, target).instances}]
            if not in_way:
                kind, timeout = "incremental", None
            elif draining < max(1, n // 4):
                # a drain toward the mix is not given up: giving up wastes what it withheld so far,
                # and the same change would be desired again at once
                kind, timeout = "drain", MIX_DRAIN_TIMEOUT_S
                draining += 1
            else:
                continue
            left.remove(target)
            self.allocator.set_desired(state.gpu_uuid, target, kind=kind, drain_timeout_s=timeout)
            self._begin(state.gpu_uuid)

    def _plan(self) -> None:
        period = self.config.policy.period_s
        if self.config.policy.mix_every:
            if self._dirty:
                self._mix_track()
                self._dirty = False
            for gpu in sorted(self._draining):
                self._begin(gpu)
        elif period is not None:
            self.allocator.announce_repartitioner(10**6)
            if self.now >= self._next_period and self._parts:
                self._next_period = self.now + period
                self._proportional()
            for gpu in sorted(self._draining):
                self._begin(gpu)
        elif self._dirty and (self._waiting > 0 or self.config.plan_while_idle):
            # a drain carries the planner's timeout in its desired layout, as in the live service
            for p in service.run_once(self.allocator, knobs=self.config.knobs, announce_s=10**6, history=self.config.history):
                self._begin(p.gpu_uuid)
            for gpu in sorted(self._draining):
                self._begin(gpu)
            self._dirty = False
        if self._done < len(self.jobs):
            self._at(self.now + self.config.plan_interval_s, "plan")

    # ------------------------------------------------------------------ run

    def run(self) -> SimResult:
        started = time.perf_counter()
        self._setup()
        try:
            for i, job in enumerate(self.jobs):
                self._at(job.arrival_s, "arrive", i)
            if self.config.policy.dynamic:
                self._at(0.0, "plan")
            while self._heap:
                t, _, kind, data = heapq.heappop(self._heap)
                if t > self.max_virtual_s:
                    break
                self.clock.set_ms(T0_MS + round(t * 1000))
                if kind == "arrive":
                    self._arrive(data)  # type: ignore[arg-type]
                elif kind == "done":
                    self._finish_part(data)  # type: ignore[arg-type]
                elif kind == "renew":
                    part = self._parts.get(data)  # type: ignore[arg-type]
                    if part is not None:
                        self.allocator.renew(part.request_id, part.fence, LEASE_TTL_S)
                        self._at(self.now + RENEW_EVERY_S, "renew", data)
                elif kind == "carve":
                    self._carve(data)  # type: ignore[arg-type]
                elif kind == "plan":
                    self._plan()
            layouts = [str(agent.backend.layout(i)) for agent, i in self._gpus.values()]
            violations = check_events(self.allocator.events()).violations
        finally:
            self._teardown()
        unfinished = [r.name for r in self._results if r.end_s is None and not r.rejected]
        ran = [j for j, r in zip(self.jobs, self._results) if not r.rejected]
        return SimResult(
            policy=self.config.policy.name,
            fleet=str(self.fleet),
            capacity=self.capacity,
            jobs=self._results,
            rejected=self._rejected,
            unfinished=unfinished,
            timeline=self._timeline,
            reconfigurations=self._counts["applied"],
            range_drains=self._counts["drains"],
            skipped_changes=self._counts["skipped"],
            lower_bound_s=lower_bound(ran, self.capacity, self.memory_gb) if ran else 0.0,
            wall_s=time.perf_counter() - started,
            layouts_end=layouts,
            violations=violations,
            queue_by_kind=self._queue_by_kind,
        )
