"""The repartitioning planner: valid layouts, busy slices untouched, drains only when they pay."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_mig.errors import ConfigError
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout, Placement, creatable, get_model, validate_layout
from prefect_mig.repartition import DemandBook, GpuState, Knobs, plan

SEVEN = Layout.parse("H100-80GB", " + ".join(f"1g.10gb@{i}" for i in range(7)))


@contextmanager
def seven_ones_agent(alloc, tmp_path, **agent_options):
    """One simulated H100 carved 7x 1g.10gb, its node agent, the inventory published."""
    from prefect_mig.agent import NodeAgent

    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, SEVEN)
        agent = NodeAgent(backend, alloc, node="node-a", **agent_options)
        agent.publish()
        yield backend, agent


def test_planner_returns_an_empty_plan_when_nothing_is_wanted():
    (p,) = plan([GpuState(gpu_uuid="g", layout=SEVEN)], demand={})
    assert (p.kind, p.steps, p.target) == ("none", 0, SEVEN)


def test_queued_3g_demand_re_carves_the_idle_part_of_a_7x1g_gpu_around_running_1g_leases():
    busy = frozenset(Placement(profile="1g.10gb", start=s) for s in (4, 5, 6))
    (p,) = plan([GpuState(gpu_uuid="g", layout=SEVEN, busy=busy)], demand={"H100-80GB/3g.40gb": 2.0})
    assert p.kind == "incremental"
    assert str(p.target) == "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"
    assert set(p.destroy) == {Placement(profile="1g.10gb", start=s) for s in range(4)}
    assert not busy & set(p.destroy)


def test_a_fully_busy_gpu_is_drained_only_when_the_gain_beats_the_drain_cost():
    busy = frozenset(SEVEN.instances)
    gpu = GpuState(gpu_uuid="g", layout=SEVEN, busy=busy)
    (kept,) = plan([gpu], demand={"H100-80GB/7g.80gb": 1.0}, knobs=Knobs(drain_cost=8.0))
    assert kept.kind == "none"
    (drained,) = plan([gpu], demand={"H100-80GB/7g.80gb": 1.0, "H100-80GB/1g.10gb": 0.0}, knobs=Knobs(drain_cost=0.05))
    assert drained.kind == "drain" and str(drained.target) == "7g.80gb@0"


def test_demand_served_by_one_gpu_is_not_chased_by_every_other():
    gpus = [GpuState(gpu_uuid=f"g{i}", layout=SEVEN) for i in range(3)]
    plans = plan(gpus, demand={"H100-80GB/3g.40gb": 2.0, "H100-80GB/1g.10gb": 10.0})
    threes = sum(p.target.profile_counts().get("3g.40gb", 0) for p in plans)
    assert threes == 2  # exactly the demand, the rest stays 1g for the 1g demand


def test_demand_book_weights_priority_and_history():
    book = DemandBook(history_weight=0.5)
    book.add_queued(["H100-80GB/3g.40gb", "H100-80GB/4g.40gb"], priority=10)
    book.add_history("H100-80GB/1g.10gb", priority=0)
    assert book.demand == {"H100-80GB/3g.40gb": [2.0], "H100-80GB/1g.10gb": [0.5]}


MODELS = ["H100-80GB", "A30-24GB", "A100-40GB"]


@st.composite
def gpu_states(draw, index=0):
    model = get_model(draw(st.sampled_from(MODELS)))
    current: list[Placement] = []
    for _ in range(draw(st.integers(0, 8))):
        options = creatable(model, current, "classic")
        if not options:
            break
        current.append(draw(st.sampled_from(options)))
    layout = Layout.of(model, current)
    busy = frozenset(p for p in current if draw(st.booleans()))
    return GpuState(gpu_uuid=f"GPU-{draw(st.uuids())}", layout=layout, busy=busy)


@st.composite
def demands(draw):
    keys = [f"{m}/{p.name}" for m in MODELS for p in get_model(m).classic_profiles]
    return {k: draw(st.floats(0, 5)) for k in draw(st.lists(st.sampled_from(keys), max_size=6, unique=True))}


@settings(max_examples=150, deadline=None)
@given(st.lists(gpu_states(), min_size=1, max_size=6), demands())
def test_plans_are_valid_layouts_that_never_touch_busy_slices(gpus, demand):
    for gpu, p in zip(gpus, plan(gpus, demand)):
        model = get_model(gpu.layout.gpu_model)
        validate_layout(model, p.target.instances)
        after = (set(gpu.layout.instances) - set(p.destroy)) | set(p.create)
        assert after == set(p.target.instances)
        if p.kind != "drain":
            assert not gpu.busy & set(p.destroy), (str(gpu.layout), [str(b) for b in gpu.busy])
        if p.kind == "none":
            assert p.steps == 0


def test_applying_a_plan_on_the_simulated_nvml_yields_exactly_the_planned_layout(tmp_path):
    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, SEVEN)
        running = [m for m in backend.instances(0) if m.start >= 4]
        for m in running:  # work runs on 1g@4..6: the driver would refuse to destroy those
            nvml.attach_process(m.mig_uuid, pid=1000 + m.start)
        busy = frozenset(m.placement for m in running)
        (p,) = plan([GpuState(gpu_uuid="g", layout=backend.layout(0), busy=busy)], demand={"H100-80GB/3g.40gb": 1.0})
        backend.apply_layout(0, p.target)
        assert backend.layout(0) == p.target
        assert {m.mig_uuid for m in backend.instances(0)} >= {m.mig_uuid for m in running}


def test_the_dry_run_plans_from_the_live_queue_and_never_touches_leased_slices(alloc):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.errors import Unsatisfiable
    from prefect_mig.repartition.service import plan_from_allocator

    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [str(SEVEN)]})
    held = [alloc.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(3)]
    with pytest.raises(Unsatisfiable):  # no repartitioner: nobody would ever carve a 3g
        alloc.try_acquire(SliceRequest(min_memory_gb=30), wait=True)
    alloc.queue_uncarved = True  # a repartitioner runs: the request waits for it to carve a 3g
    queued = alloc.try_acquire(SliceRequest(min_memory_gb=30), wait=True)
    assert queued.request_id
    (p,) = plan_from_allocator(alloc)
    leased = {Placement(profile=h.slice.profile, start=h.slice.start) for h in held} | {
        Placement(profile="1g.10gb", start=s["start"]) for s in alloc.status()["slices"] if s["state"] == "leased"
    }
    assert p.kind == "incremental" and "3g.40gb" in str(p.target)
    assert not leased & set(p.destroy)


def test_queued_3g_requests_are_served_after_the_service_re_carves_while_1g_leases_keep_running(alloc, tmp_path):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import run_once

    alloc.queue_uncarved = True  # a repartitioner runs
    with seven_ones_agent(alloc, tmp_path) as (backend, agent):
        ones = [alloc.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(3)]  # 1g@0,1,2
        for lease in ones:
            backend.nvml.attach_process(lease.slice.mig_uuid, pid=lease.slice.start + 100)
        waiting = [alloc.try_acquire(SliceRequest(profile="3g.40gb", priority=5), wait=True) for _ in range(2)]

        changes = run_once(alloc)
        assert [p.kind for p in changes] == ["incremental"]
        assert alloc.desired(changes[0].gpu_uuid)["layout"] == str(changes[0].target)
        assert agent.tick() == "applied"

        layout = backend.layout(0)
        assert "3g.40gb@4" in str(layout)
        for lease in ones:  # the running 1g leases and their MIG devices are untouched
            assert alloc.lease(lease.lease_id).fence == lease.fence
            assert lease.slice.mig_uuid in {m.mig_uuid for m in backend.instances(0)}
        served = [w for w in waiting if _granted(alloc, w.request_id)]
        assert len(served) == 1  # one 3g fits next to the busy 1g slices; the other keeps waiting
        assert alloc.desired(changes[0].gpu_uuid) is None
        assert "layout.applied" in [e["type"] for e in alloc.events()]


def _granted(alloc, request_id) -> bool:
    from prefect_mig.errors import LeaseLost

    try:
        alloc.lease(request_id)
    except LeaseLost:
        return False
    return True


def test_an_agent_killed_half_way_converges_when_it_restarts(alloc, tmp_path):
    from prefect_mig.agent import NodeAgent

    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, SEVEN)
        NodeAgent(backend, alloc, node="node-a").publish()
        gpu = backend.gpu(0).uuid
        target = Layout.parse("H100-80GB", "3g.40gb@0 + 3g.40gb@4")
        alloc.set_desired(gpu, str(target), kind="incremental")
        # the first agent withdrew the 1g slices and destroyed some of them, then died
        alloc.withdraw([m.mig_uuid for m in backend.instances(0)])
        for m in backend.instances(0)[:3]:
            backend.destroy(0, m.gpu_instance_id)
        restarted = NodeAgent(backend, alloc, node="node-a")
        assert restarted.tick() == "applied"
        assert backend.layout(0) == target
        states = {s["profile"]: s["state"] for s in alloc.status()["slices"]}
        assert states == {"3g.40gb": "free"}


def test_a_drain_plan_waits_for_the_leases_of_the_range_then_re_carves(alloc, tmp_path):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.errors import NoCapacity

    with seven_ones_agent(alloc, tmp_path) as (backend, agent):
        held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
        gpu = backend.gpu(0).uuid
        alloc.set_desired(gpu, "7g.80gb@0", kind="drain")
        assert agent.apply_desired(0, gpu) == "draining"
        with pytest.raises(NoCapacity):  # no new grants while draining
            alloc.try_acquire(SliceRequest(profile="1g.10gb"))
        alloc.release(held.lease_id, held.fence)
        assert agent.apply_desired(0, gpu) == "applied"
        assert str(backend.layout(0)) == "7g.80gb@0"
        assert alloc.try_acquire(SliceRequest(profile="7g.80gb")).slice.profile == "7g.80gb"


def test_the_repartition_flow_desires_the_change(alloc, prefect_api, redis_server, namespace):
    import runpy
    from pathlib import Path

    from prefect_mig.allocator import SliceRequest

    alloc.queue_uncarved = True
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [str(SEVEN)]})
    alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True)
    flow_file = Path(__file__).resolve().parents[1] / "flows" / "repartition.py"
    changes = runpy.run_path(str(flow_file), run_name="flow")["repartition"](redis_url=redis_server.url, namespace=namespace)
    assert [c["kind"] for c in changes] == ["incremental"] and "3g.40gb" in changes[0]["target"]
    assert alloc.desired(changes[0]["gpu_uuid"])["layout"] == changes[0]["target"]


def test_while_a_repartitioner_runs_requests_wait_for_kinds_it_will_carve(alloc):
    from prefect_mig.allocator import Queued, SliceRequest
    from prefect_mig.errors import Unsatisfiable

    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [str(SEVEN)]})
    with pytest.raises(Unsatisfiable):
        alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True)
    alloc.announce_repartitioner(60)
    assert isinstance(alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True), Queued)


def test_a_range_drain_keeps_the_rest_of_the_gpu_granting(alloc, tmp_path):
    from prefect_mig.allocator import SliceRequest

    with seven_ones_agent(alloc, tmp_path) as (backend, agent):
        held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
        assert held.slice.start == 0
        gpu = backend.gpu(0).uuid
        target = "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"
        alloc.set_desired(gpu, target, kind="drain")
        assert agent.apply_desired(0, gpu) == "draining"
        # the range being re-carved (slices 0-3) grants nothing; 4-6 go on granting
        starts = {alloc.try_acquire(SliceRequest(profile="1g.10gb")).slice.start for _ in range(3)}
        assert starts == {4, 5, 6}
        alloc.release(held.lease_id, held.fence)
        assert {s["start"]: s["state"] for s in alloc.status()["slices"]}[0] == "withdrawn"
        assert agent.apply_desired(0, gpu) == "applied"
        assert str(backend.layout(0)) == target
        assert alloc.redis.smembers(alloc.keys.withholding) == set()  # the publish removed them
        assert alloc.try_acquire(SliceRequest(profile="3g.40gb")).slice.start == 0


def test_between_pipeline_runs_only_slices_idle_for_the_idle_window_are_re_carved(alloc, clock):
    """With nothing waiting, a layout is re-shaped toward recent demand only where slices have
    been idle for the idle window: the gaps between a pipeline's steps do not churn it. A waiting
    request re-carves at once."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import plan_from_allocator

    alloc.queue_uncarved = True
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [str(SEVEN)]})
    leases = [alloc.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(7)]
    clock.advance(5)
    for lease in leases:  # a pipeline step just ended
        alloc.release(lease.lease_id, lease.fence)
    # the recent demand is the 3g here (history=0 leaves the step's seven 1g.10gb grants out: as
    # many recent requests, they would keep the layout as it is)
    recent = {"H100-80GB/3g.40gb": 2.0}
    knobs = Knobs(idle_window_s=300)
    assert plan_from_allocator(alloc, knobs=knobs, extra_demand=recent, history=0)[0].kind == "none"
    assert plan_from_allocator(alloc, knobs=Knobs(idle_window_s=0), extra_demand=recent, history=0)[0].kind == "incremental"
    clock.advance(301)  # the window passed: this is a pause between runs
    assert "3g.40gb" in str(plan_from_allocator(alloc, knobs=knobs, extra_demand=recent, history=0)[0].target)
    # a request waiting for a 3g re-carves warm slices right away
    again = [alloc.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(7)]
    clock.advance(1)
    for lease in again:
        alloc.release(lease.lease_id, lease.fence)
    alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True)
    (p,) = plan_from_allocator(alloc, knobs=knobs)
    assert p.kind == "incremental" and "3g.40gb" in str(p.target)


def test_nothing_is_drained_while_nothing_waits(alloc):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import plan_from_allocator

    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [str(SEVEN)]})
    for _ in range(7):
        alloc.try_acquire(SliceRequest(profile="1g.10gb"))
    wanted = {"H100-80GB/7g.80gb": 10.0}
    assert plan_from_allocator(alloc, knobs=Knobs(drain_cost=0.05), extra_demand=wanted)[0].kind == "none"
    assert plan([GpuState(gpu_uuid="g", layout=SEVEN, busy=frozenset(SEVEN.instances))], wanted,
                Knobs(drain_cost=0.05))[0].kind == "drain"


def test_a_drain_that_outlives_its_timeout_puts_the_slices_back_and_is_not_retried_at_once(alloc, clock, tmp_path):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import run_once

    with seven_ones_agent(alloc, tmp_path, drain_timeout_s=60, clock=lambda: clock.now_ms() / 1000) as (backend, agent):
        held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
        gpu = backend.gpu(0).uuid
        alloc.set_desired(gpu, "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6", kind="drain")
        assert agent.apply_desired(0, gpu) == "draining"
        clock.advance(61)
        assert agent.apply_desired(0, gpu) == "skipped"
        states = {s["start"]: s["state"] for s in alloc.status()["slices"]}
        assert states == {0: "leased", 1: "free", 2: "free", 3: "free", 4: "free", 5: "free", 6: "free"}
        assert alloc.redis.smembers(alloc.keys.withholding) == set()
        assert str(backend.layout(0)) == str(SEVEN)
        # the same drain is not desired again before retry_after_s
        alloc.queue_uncarved = True
        alloc.try_acquire(SliceRequest(profile="7g.80gb", priority=10), wait=True)
        assert run_once(alloc, knobs=Knobs(drain_cost=0.1, retry_after_s=600)) == []
        clock.advance(601)
        assert [p.gpu_uuid for p in run_once(alloc, knobs=Knobs(drain_cost=0.1, retry_after_s=600))] == [gpu]
        alloc.release(held.lease_id, held.fence)


def test_without_drains_a_busy_slice_the_layout_lost_does_not_break_the_plan():
    gone = frozenset({Placement(profile="1g.10gb", start=0), Placement(profile="2g.20gb", start=0)})
    (p,) = plan([GpuState(gpu_uuid="g", layout=SEVEN, busy=gone)], {"H100-80GB/3g.40gb": 1.0}, Knobs(drains=False))
    assert p.kind in ("none", "incremental") and Placement(profile="1g.10gb", start=0) in p.target.instances


def test_a_served_request_counts_its_memory_as_well_as_its_compute():
    from prefect_mig.repartition.planner import slice_value

    assert slice_value("H100-80GB", "1g.10gb") == 1
    assert slice_value("H100-80GB", "1g.20gb") == 1.75  # two of eight memory slices
    assert slice_value("H100-80GB", "3g.40gb") == 3.5 and slice_value("H100-80GB", "7g.80gb") == 7
    # four 1g.20gb requests fill the GPU's memory: serving them is worth the whole GPU, not 4 of 7
    fresh = GpuState(gpu_uuid="GPU-0", layout=Layout.parse("H100-80GB", "7g.80gb@0"))
    (p,) = plan([fresh], {"H100-80GB/1g.20gb": 4.0}, Knobs(profiles="extended", value_by="dominant"))
    assert p.target.profile_counts() == {"1g.20gb": 4} and p.served == 7


def test_a_drain_is_priced_by_the_expected_remaining_run_time_of_the_leases_in_its_way():
    ones = Layout.parse("H100-80GB", " + ".join(f"1g.10gb@{i}" for i in range(7)))
    busy = frozenset({Placement(profile="1g.10gb", start=0)})
    demand = {"H100-80GB/7g.80gb": 1.0}

    def planned(remaining_s):
        gpu = GpuState(gpu_uuid="GPU-0", layout=ones, busy=busy, remaining_s=remaining_s)
        return plan([gpu], demand, Knobs(value_by="dominant"))[0]  # the 7g request is worth 7

    soon = planned(((("1g.10gb", 0), 90.0),))
    assert soon.kind == "drain" and soon.drain_timeout_s == 90  # once the expected 90 s
    assert planned(((("1g.10gb", 0), 7200.0),)).kind == "none"  # two more hours: not worth the wait
    assert planned(()).kind == "drain" and planned(()).drain_timeout_s is None  # no history: the flat cost


def test_a_drain_waits_for_every_lease_in_its_way_not_just_the_longest_expected_one():
    # four 1g.20gb leases expected to run 100 s more each: the last of them is expected to end
    # after 208 s (exponential run times), so a timeout of 100 s (once the longest expectation)
    # gave up on most such drains after withholding every slice that had freed meanwhile
    fours = Layout.parse("H100-80GB", "1g.20gb@0 + 1g.20gb@2 + 1g.20gb@4 + 1g.20gb@6")
    busy = frozenset(Placement(profile="1g.20gb", start=s) for s in (0, 2, 4, 6))
    gpu = GpuState(gpu_uuid="GPU-0", layout=fours, busy=busy, remaining_s=tuple((("1g.20gb", s), 100.0) for s in (0, 2, 4, 6)))
    (p,) = plan([gpu], {"H100-80GB/7g.80gb": [2.0]}, Knobs(profiles="extended"))
    assert p.kind == "drain" and p.drain_timeout_s == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 1 / 4))


def test_a_drain_is_not_started_when_the_slices_it_withholds_from_waiting_requests_outweigh_its_gain():
    """Two of four 1g.20gb slices are idle, four 1g.20gb requests wait, and a 7g request (priority
    17) waits too; the two leases in the way are expected to run 600 s more each. Draining to
    7g.80gb takes the idle slices out for the whole wait for *both* leases (900 s expected, not
    600 s) and each busy slice from its own end to the other's: 2,400 slice-seconds that the
    waiting 1g.20gb requests lose, against one 7g request served 900 s sooner. The planner
    used to count only the idle slices, for 600 s, and drained; now it keeps the layout. (At a
    drain cost of 5 per lease expected to run 600 s more, each request valued by its dominant
    share: the arithmetic above is priced at it.)"""
    fours = Layout.parse("H100-80GB", "1g.20gb@0 + 1g.20gb@2 + 1g.20gb@4 + 1g.20gb@6")
    busy = frozenset({Placement(profile="1g.20gb", start=0), Placement(profile="1g.20gb", start=2)})
    gpu = GpuState(gpu_uuid="GPU-0", layout=fours, busy=busy,
                   remaining_s=((("1g.20gb", 0), 600.0), (("1g.20gb", 2), 600.0)))

    def planned(priority: int):
        demand = {"H100-80GB/7g.80gb": [1 + priority / 10], "H100-80GB/1g.20gb": [1.0] * 4}
        return plan([gpu], demand, Knobs(profiles="extended", drain_cost=5.0, value_by="dominant"))[0]

    kept = planned(17)
    assert kept.kind == "none" and kept.target == fours
    # a big enough gain still pays for it, and the drain then waits for both leases (900 s)
    urgent = planned(25)
    assert urgent.kind == "drain" and urgent.drain_timeout_s == pytest.approx(900)


def test_expected_remaining_run_time_comes_from_the_lease_history():
    from prefect_mig.repartition.service import expected_remaining

    events = [
        {"type": "lease.granted", "lease": "a", "at": 0},
        {"type": "lease.released", "lease": "a", "at": 100_000},  # ran 100 s
        {"type": "lease.granted", "lease": "b", "at": 0},
        {"type": "lease.released", "lease": "b", "at": 1_000_000},  # ran 1,000 s
        {"type": "lease.granted", "lease": "c", "at": 1_000_000},
        {"type": "lease.granted", "lease": "d", "at": 0},
    ]
    status = {"slices": [{"id": "s1", "state": "leased", "lease": "c"}, {"id": "s2", "state": "leased", "lease": "d"},
                         {"id": "s3", "state": "free", "lease": None}]}
    # c is 200 s old: only the 1,000 s lease ran longer, so 800 s more; d (1,200 s) outlived all
    assert expected_remaining(status, events, now_ms=1_200_000) == {"s1": 800.0, "s2": 1200.0}
    assert expected_remaining(status, events[4:], now_ms=1_200_000) == {}


def test_a_lease_granted_before_the_history_read_is_expected_to_run_as_long_as_leases_that_old():
    """The service reads a capped tail of the event stream: a lease granted before it is at least
    as old as its oldest event. It used to get no estimate, so a drain priced it at the flat
    600 s and timed out at the agent's 600 s while such long leases ran on for hours (seen on
    tuning day 135: drains to 7g.80gb withholding four idle slices, then given up)."""
    from prefect_mig.repartition.service import expected_remaining

    events = [
        {"type": "lease.granted", "lease": "a", "at": 1_000_000},
        {"type": "lease.released", "lease": "a", "at": 1_100_000},  # ran 100 s
        {"type": "lease.granted", "lease": "b", "at": 1_000_000},
        {"type": "lease.released", "lease": "b", "at": 4_000_000},  # ran 3,000 s
    ]
    status = {"slices": [{"id": "s1", "state": "leased", "lease": "old"}, {"id": "s2", "state": "leased", "lease": "c"}]}
    events.append({"type": "lease.granted", "lease": "c", "at": 4_100_000})
    # "old" is at least 3,200 s old (the oldest event) and has outlived every finished lease: its
    # age again, as for a known lease that old; "c" (100 s old) is known: only b ran longer
    assert expected_remaining(status, events, now_ms=4_200_000) == {"s1": 3200.0, "s2": 2900.0}


def test_memory_bound_demand_moves_a_gpu_from_2g_20gb_to_1g_20gb_slices():
    # the held-out window where dynamic lost ended on 2g.20gb slices while 16 GB pods queued: with
    # the extended profiles those pods count for 1g.20gb, and four of them fill the memory
    twos = GpuState(gpu_uuid="GPU-0", layout=Layout.parse("H100-80GB", "2g.20gb@0 + 2g.20gb@2 + 2g.20gb@4 + 1g.10gb@6"))
    book = DemandBook(profiles="extended")
    for _ in range(6):
        book.add_queued(["H100-80GB/1g.20gb", "H100-80GB/2g.20gb"], priority=0)
    (p,) = plan([twos], book.demand, Knobs(profiles="extended"))
    assert p.target.profile_counts() == {"1g.20gb": 4} and p.kind == "incremental"


def test_the_live_service_by_default_carves_the_1g_20gb_slices_a_queued_request_asks_for(alloc):
    """`1g.20gb` is an H100 profile a user may ask for by name; with the classic profiles (the
    service's old default) no layout the planner could choose held one, so the request waited
    forever on a GPU that was idle."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import plan_from_allocator

    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
    alloc.queue_uncarved = True  # a repartitioner runs: the request waits for it to carve one
    assert alloc.try_acquire(SliceRequest(profile="1g.20gb"), wait=True).request_id
    (p,) = plan_from_allocator(alloc)
    assert p.kind == "incremental" and "1g.20gb" in p.target.profile_counts()


def test_the_live_service_gives_a_drain_the_timeout_the_lease_history_gives_it(alloc, clock, tmp_path):
    """Not the agent's fixed timeout: finished leases ran 100 s and 300 s, so a lease 50 s old is
    expected to run 150 s more and the drain waits that long for it, then gives up."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import run_once

    with seven_ones_agent(alloc, tmp_path, drain_timeout_s=600, clock=lambda: clock.now_ms() / 1000) as (backend, agent):
        for ran_s in (100, 300):
            done = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
            clock.advance(ran_s)
            alloc.release(done.lease_id, done.fence)
        held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
        clock.advance(50)
        alloc.queue_uncarved = True
        alloc.try_acquire(SliceRequest(profile="7g.80gb", priority=10), wait=True)
        gpu = backend.gpu(0).uuid
        (p,) = run_once(alloc, knobs=Knobs(drain_cost=0.1))
        assert (p.kind, p.drain_timeout_s) == ("drain", 150.0)
        assert alloc.desired(gpu)["drain_timeout_s"] == 150.0
        assert agent.apply_desired(0, gpu) == "draining"
        clock.advance(149)
        assert agent.apply_desired(0, gpu) == "draining"
        clock.advance(2)  # past the planner's 150 s, long before the agent's own 600 s
        assert agent.apply_desired(0, gpu) == "skipped"
        assert str(backend.layout(0)) == str(SEVEN)
        assert {s["state"] for s in alloc.status()["slices"]} == {"leased", "free"}
        alloc.release(held.lease_id, held.fence)


def test_the_lease_history_reads_back_as_a_workload():
    from prefect_mig.repartition.service import recent_leases

    events = [
        # a waited 50 s, then ran 100 s; b runs since 200 s ago (finished leases ran 100 s and 1,000 s)
        {"type": "lease.granted", "lease": "a", "at": 50_000, "waited_ms": 50_000, "wants": "H100-80GB/1g.20gb,H100-80GB/2g.20gb"},
        {"type": "lease.released", "lease": "a", "at": 150_000},
        {"type": "lease.granted", "lease": "x", "at": 150_000, "wants": "H100-80GB/3g.40gb"},
        {"type": "lease.released", "lease": "x", "at": 1_150_000},
        {"type": "lease.granted", "lease": "b", "at": 1_000_000, "priority": "5", "wants": "H100-80GB/7g.80gb"},
    ]
    status = {"queue": [{"pkeys": ["H100-80GB/1g.10gb"], "priority": 2, "enqueued_at": 1_100_000}]}
    rows = recent_leases(status, events, now_ms=1_200_000, profiles="extended")
    assert rows == [
        (-1200.0, 150.0, "H100-80GB/1g.20gb", 0),  # arrived at 0, done after its wait and run
        (-1050.0, 1000.0, "H100-80GB/3g.40gb", 0),
        (-200.0, 1000.0, "H100-80GB/7g.80gb", 5),  # 200 s old; the 1,000 s lease says 800 s more
        (-100.0, 550.0, "H100-80GB/1g.10gb", 2),  # queued: the mean run time
    ]
    # extended is the default; with the classic profiles a request for 1g.20gb or 2g.20gb counts as 2g.20gb
    assert recent_leases(status, events, now_ms=1_200_000) == rows
    assert recent_leases(status, events, now_ms=1_200_000, profiles="classic")[0][2] == "H100-80GB/2g.20gb"


def test_a_queued_request_pinned_to_a_node_nobody_published_is_no_demand(alloc):
    """Found by a bad-input review: the repartitioner re-carved node-a's GPU to 7g.80gb for a request
    pinned to a node that does not exist. Such a request can still wait if it was queued while no
    node was published yet; it must not count as demand on the nodes that did publish."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import demand_of

    from .allocator_fixtures import H100_MIXED

    alloc.queue_uncarved = True
    alloc.try_acquire(SliceRequest(profile="7g.80gb", node="no-such-node"), wait=True)
    alloc.try_acquire(SliceRequest(profile="2g.20gb", node="node-a"), wait=True)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    assert [r["node"] for r in alloc.status()["queue"]] == ["no-such-node", "node-a"]
    assert demand_of(alloc.status(), []) == {"node-a|H100-80GB/2g.20gb": [1.0]}


def test_a_request_queued_before_any_node_published_gets_its_slice_carved_on_the_fleets_model(alloc):
    """Queued while no node was published yet, a request counted as demand for an H100-80GB kind:
    on an A30 fleet the repartitioner planned nothing for it, and it waited for good."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.allocator.health import wait_reasons
    from prefect_mig.repartition.service import demand_of, plan_from_allocator

    alloc.queue_uncarved = True
    queued = alloc.try_acquire(SliceRequest(min_memory_gb=20), wait=True)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    assert demand_of(alloc.status(), []) == {"A30-24GB/4g.24gb": [1.0]}
    assert any(r.startswith("no GPU carved for 4g.24gb; ") for r in wait_reasons(alloc, queued.request_id))
    (gpu_plan,) = plan_from_allocator(alloc)
    assert str(gpu_plan.target) == "4g.24gb@0", gpu_plan


def test_a_request_pinned_to_a_node_gets_its_slice_carved_on_that_node_not_on_another(alloc):
    """Demand was per kind of slice only: a request pinned to one node could get another node's
    GPU re-carved for it, where it cannot run, while its own node's GPU was left as it was."""
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.repartition.service import plan_from_allocator

    alloc.publish_fleet("node-a=1xH100-80GB,node-b=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"], "node-b": ["7g.80gb@0"]})
    gpu_of = {g["node"]: g["uuid"] for g in alloc.gpus()}
    last = max(gpu_of, key=gpu_of.get)  # the one planned last when both serve the same (ties go by uuid)
    alloc.queue_uncarved = True
    alloc.try_acquire(SliceRequest(profile="1g.10gb", node=last), wait=True)
    plans = {p.node: p for p in plan_from_allocator(alloc, knobs=Knobs(idle_window_s=0))}
    assert plans[last].kind == "incremental" and "1g.10gb" in str(plans[last].target)
    (other,) = set(plans) - {last}
    assert plans[other].kind == "none"


def test_pinned_demand_is_served_once_by_its_node_and_shared_demand_by_the_best_gpu():
    seven = Layout.parse("H100-80GB", "7g.80gb@0")
    gpus = [GpuState(gpu_uuid=f"g-{n}", layout=seven, node=n) for n in ("a", "b", "c")]
    demand = {"H100-80GB/3g.40gb": 2.0, "b|H100-80GB/3g.40gb": 2.0}
    counts = {p.node: p.target.profile_counts().get("3g.40gb", 0) for p in plan(gpus, demand)}
    assert counts["b"] == 2 and sum(counts.values()) == 4  # b's two pinned, the two shared elsewhere


@settings(max_examples=200, deadline=None)
@given(
    shared=st.lists(st.floats(0.1, 12), max_size=6), own=st.lists(st.floats(0.1, 12), max_size=6),
    taken=st.integers(0, 5), n=st.integers(0, 8),
)
def test_a_nodes_view_of_demand_is_the_best_units_of_the_shared_and_its_pinned_demand(shared, own, taken, n):
    from prefect_mig.repartition.planner import Remaining, pinned_key

    remaining = Remaining({"k": shared, pinned_key("a", "k"): own})
    view = remaining.on("a")
    view.take("k", taken)
    left = sorted(shared + own, reverse=True)[taken:]
    assert view.value("k", n) == pytest.approx(sum(left[:n]))
    assert remaining.value("k", n) <= view.value("k", n)  # another node sees the shared part only
    assert remaining.on("b").value("k", n) == remaining.value("k", n)


def test_an_idle_gpu_ends_more_waits_before_one_bigger_request_unless_its_priority_says_otherwise():
    # mean JCT counts every job once: three waiting 1g.10gb requests served end three waits, one
    # 7g request ends one (valued by its dominant share, 7, the 7g took the GPU; at 16x whole GPUs
    # went to early 7g requests while hundreds of small ones queued)
    idle = GpuState(gpu_uuid="GPU-0", layout=SEVEN)
    (p,) = plan([idle], {"H100-80GB/7g.80gb": [1.0], "H100-80GB/1g.10gb": [1.0] * 3})
    assert p.target.profile_counts().get("1g.10gb", 0) >= 3 and "7g.80gb" not in p.target.profile_counts()
    (urgent,) = plan([idle], {"H100-80GB/7g.80gb": [1 + 100 / 10], "H100-80GB/1g.10gb": [1.0] * 3})
    assert urgent.target.profile_counts() == {"7g.80gb": 1}
    (by_share,) = plan([idle], {"H100-80GB/7g.80gb": [1.0], "H100-80GB/1g.10gb": [1.0] * 3}, Knobs(value_by="dominant"))
    assert by_share.target.profile_counts() == {"7g.80gb": 1}


def test_a_gpus_worth_of_recent_grants_never_outweighs_one_queued_request():
    # seven recent 1g.10gb grants at a quarter each (1.75) beat a waiting 7g request (1) once each
    # request counts one; the 7g request then waited for hours at 8x (bench/scheduling.py, day 125)
    book = DemandBook()
    for _ in range(7):
        book.add_history("H100-80GB/1g.10gb", priority=0)
    book.add_queued(["H100-80GB/7g.80gb"], priority=0)
    bare = GpuState(gpu_uuid="GPU-0", layout=Layout(gpu_model="H100-80GB", instances=()))
    (p,) = plan([bare], book.demand)
    assert p.target.profile_counts() == {"7g.80gb": 1}


def test_a_knob_value_the_planner_does_not_know_is_refused_naming_it():
    with pytest.raises(ConfigError) as info:
        Knobs(value_by="size")
    assert info.value.field == "value_by" and "request, dominant" in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("knob", ["churn_cost", "drain_cost", "drain_reference_s", "drain_timeout_factor", "drain_timeout_min_s",
                                  "fragmentation_cost", "idle_window_s", "retry_after_s", "history_weight"])
def test_a_knob_that_is_not_a_finite_number_of_zero_or_more_is_refused_naming_it(knob, value):
    """A NaN knob made every comparison false: `repartition serve --drain-cost nan` ran on, planning as
    if it had been given some other number, and said nothing."""
    with pytest.raises(ConfigError) as info:
        Knobs(**{knob: value})
    assert info.value.field == knob and f"{knob}={value!r}" in str(info.value) and "finite" in str(info.value)


@pytest.mark.parametrize("flag", ["--drain-cost", "--idle-window"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_repartition_refuses_a_knob_flag_that_is_not_a_finite_number(flag, value, redis_server, namespace, monkeypatch):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    for command in (["repartition", "plan", "--json"], ["repartition", "apply", "--json"]):
        result = CliRunner().invoke(app, [*command, flag, value])
        assert result.exit_code == 2, result.output
        assert flag in result.output and value in result.output and "finite" in result.output
