"""The simulator on every catalog model, its lower bound, and the baselines dynamic is measured
against (rejection flags, the searched static mix, fractional sharing)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest

from prefect_mig.model.catalog import catalog
from prefect_mig.simulation.engine import SimConfig, Simulator
from prefect_mig.simulation.policies import parse_policy
from prefect_mig.simulation.report import compare, ratios
from prefect_mig.simulation.workload import Job, load_trace, need_of, v100_per_slice

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "alibaba-gpu-v2023" / "openb_pod_list_default.csv"
MODELS = sorted(catalog().models)


@pytest.mark.parametrize("model", MODELS)
def test_every_catalog_model_runs_every_policy_on_50_trace_pods(model, redis_server, tmp_path):
    from prefect_mig.repartition.planner import Knobs
    from prefect_mig.simulation.report import DEFAULT_POLICIES, summary

    jobs = load_trace(TRACE, gpu_model=model, start_s=115 * 86400, jobs=50, max_duration_s=7200)
    jobs = [dataclasses.replace(j, arrival_s=j.arrival_s / 8) for j in jobs]
    results = compare(redis_server.client(), jobs, fleet=f"n=2x{model}", policies=DEFAULT_POLICIES,
                      knobs=Knobs(profiles="extended"), state_dir=tmp_path, finalists=1)
    doc = summary(results)
    assert [p["policy"] for p in doc["policies"]] == list(DEFAULT_POLICIES)
    for row in doc["policies"]:
        assert row["invariant_violations"] == 0 and row["unfinished"] == 0, row
        if row["makespan_vs_lower_bound"] is not None:
            assert row["makespan_vs_lower_bound"] >= 1 - 1e-6, row


def test_simulate_with_extended_profiles_on_an_a30_fleet_writes_its_json(tmp_path):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    out = tmp_path / "out"
    args = ["simulate", "--trace", str(TRACE), "--jobs", "50", "--fleet", "n=2xA30-24GB", "--profiles", "extended",
            "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "simulation.json").read_text())
    assert doc["policies"] and all(row["invariant_violations"] == 0 for row in doc["policies"])
    # the JSON says how to repeat the run exactly
    assert doc["trace_sha256"] == hashlib.sha256(TRACE.read_bytes()).hexdigest()
    assert doc["knobs"]["profiles"] == "extended" and doc["seed"] is None
    assert doc["command"].startswith("prefect-mig simulate --trace ") and "--fleet n=2xA30-24GB" in doc["command"]
    assert (out / "simulation.png").read_bytes()[:4] == b"\x89PNG"


def test_the_v100_mapping_uses_each_models_own_compute():
    assert round(v100_per_slice("H100-80GB"), 2) == 1.13
    assert round(v100_per_slice("A100-40GB"), 2) == 0.36  # 312 TFLOPS / 7 slices against 125
    # a whole V100 is three A100 slices of compute, and a whole A30 (165 / 4 per slice)
    assert need_of(num_gpu=1, gpu_milli=1000, mapping="v100", gpu_model="A100-80GB") == [(16.0, 3)]
    assert need_of(num_gpu=1, gpu_milli=1000, mapping="v100", gpu_model="A30-24GB") == [(16.0, 4)]


def _random_jobs(rng: random.Random, n: int) -> list[Job]:
    sizes = [(10.0, 1), (20.0, 1), (20.0, 2), (40.0, 3), (40.0, 4), (80.0, 7)]
    return [
        Job(f"r{i}", round(rng.uniform(0, 300), 1), round(rng.uniform(10, 400), 1), (rng.choice(sizes),), rng.choice((0, 5, 10)))
        for i in range(n)
    ]


def test_the_lower_bound_is_never_above_any_policys_makespan(redis_server, tmp_path):
    rng = random.Random(14)
    policies = ["whole-gpu", "static:mixed", "static:fitted", "dynamic"]
    for trial in range(4):
        jobs = _random_jobs(rng, rng.randint(4, 12))
        results = compare(redis_server.client(), jobs, fleet="n=2xH100-80GB", policies=policies,
                          knobs=parse_knobs(), state_dir=tmp_path / str(trial))
        for r in results:
            assert r.lower_bound_s <= r.makespan_s + 1e-6, (trial, r.policy, r.lower_bound_s, r.makespan_s)
    # memory counts: two jobs that each need all the memory and one compute slice cannot overlap
    jobs = [Job("m1", 0, 100, ((80.0, 1),)), Job("m2", 0, 100, ((80.0, 1),))]
    result = Simulator(redis_server.client(), jobs,
                       SimConfig(fleet="n=1xH100-80GB", policy=parse_policy("whole-gpu", "H100-80GB")),
                       state_dir=tmp_path / "m").run()
    assert result.lower_bound_s == 200 == result.makespan_s


def parse_knobs():
    from prefect_mig.repartition.planner import Knobs

    return Knobs(profiles="extended")


def test_a_policy_that_rejects_jobs_shows_its_rejection_rate_and_is_never_best(redis_server, tmp_path):
    jobs = [Job("big", 0, 50, ((40.0, 3),)), *[Job(f"s{i}", 0, 50, ((10.0, 1),)) for i in range(3)]]
    results = compare(redis_server.client(), jobs, fleet="n=1xH100-80GB",
                      policies=["static:smallest", "static:mixed"], state_dir=tmp_path)
    rows = {r.policy: r.summary() for r in results}
    assert rows["static:smallest"]["rejection_rate"] == 0.25
    assert rows["static:mixed"]["rejection_rate"] == 0.0
    assert ratios(results)["best_static"] == "static:mixed"


def test_the_static_search_finds_the_known_optimum_at_least_as_good_as_fitted(redis_server, tmp_path):
    # 8 jobs that each fit 1g.20gb, all at once, on 2 GPUs: two 4x 1g.20gb layouts run them all at
    # once, so no schedule beats a mean JCT of 100 s
    jobs = [Job(f"m{i}", 0, 100, ((20.0, 1),)) for i in range(8)]
    # then a later whole-GPU job that a mix must also hold, and more small ones behind it
    harder = jobs + [Job("w", 50, 400, ((80.0, 7),))] + [Job(f"n{i}", 60, 100, ((10.0, 1),)) for i in range(6)]
    for name, workload in (("optimum", jobs), ("harder", harder)):
        results = compare(redis_server.client(), workload, fleet="n=2xH100-80GB", knobs=parse_knobs(),
                          policies=["static:fitted", "static:searched"], state_dir=tmp_path / name)
        by = {r.policy: r.summary() for r in results}
        assert by["static:searched"]["rejected"] == 0
        assert by["static:searched"]["jct_mean_s"] <= by["static:fitted"]["jct_mean_s"], by
        if name == "optimum":
            assert by["static:searched"]["jct_mean_s"] == 100


def test_sharing_reproduces_whole_gpu_when_every_job_needs_a_whole_gpu(redis_server, tmp_path):
    rng = random.Random(3)
    jobs = [Job(f"w{i}", round(rng.uniform(0, 500)), round(rng.uniform(50, 300)), ((80.0, 7),), rng.choice((0, 10)))
            for i in range(9)]
    jobs.sort(key=lambda j: j.arrival_s)
    whole, sharing = compare(redis_server.client(), jobs, fleet="n=2xH100-80GB", policies=["whole-gpu", "sharing"],
                             state_dir=tmp_path)
    assert [(j.name, j.start_s, j.end_s) for j in sharing.jobs] == [(j.name, j.start_s, j.end_s) for j in whole.jobs]
    # both count their queue per slice kind the same way
    assert sharing.queue_by_kind == whole.queue_by_kind


def test_sharing_packs_by_memory_and_slows_co_runners_by_the_stated_interference():
    from prefect_mig.simulation.baselines import SHARING_INTERFERENCE, share

    two = share([Job("a", 0, 100, ((10.0, 1),)), Job("b", 0, 100, ((10.0, 1),))], "n=1xH100-80GB")
    assert [j.end_s for j in two.jobs] == [pytest.approx(100 * (1 + SHARING_INTERFERENCE))] * 2
    # three jobs needing 4 of 7 compute slices each share the compute too; the bound still holds
    three = share([Job(f"c{i}", 0, 100, ((20.0, 4),)) for i in range(3)], "n=1xH100-80GB")
    assert three.makespan_s == pytest.approx(100 * 12 / 7 * (1 + SHARING_INTERFERENCE))
    assert three.lower_bound_s <= three.makespan_s
    # a job bigger than any GPU's memory is rejected, not queued forever
    assert share([Job("huge", 0, 10, ((90.0, 7),))], "n=1xH100-80GB").rejected == ["huge"]


def test_the_proportional_anchor_re_partitions_toward_the_live_demand(redis_server, tmp_path):
    from prefect_mig.simulation.workload import synthetic

    jobs = synthetic(jobs=60, mean_interarrival_s=20, mean_duration_s=600, seed=5)
    (result,) = compare(redis_server.client(), jobs, fleet="n=2xH100-80GB", policies=["proportional"],
                        knobs=parse_knobs(), state_dir=tmp_path)
    assert result.reconfigurations > 0 and not result.violations
    assert not result.unfinished and not result.rejected
    assert result.lower_bound_s <= result.makespan_s


def test_the_jct_floor_is_1_where_nothing_waits_and_shows_the_room_where_jobs_queue(redis_server, tmp_path):
    from prefect_mig.simulation.report import jct_floor

    # four small jobs, staggered, on a mix that holds them all at once: nobody waits, so no policy
    # can do better than the static mix, and the floor says so
    jobs = [Job(f"s{i}", 10 * i, 100 + 50 * i, ((10.0, 1),)) for i in range(4)]
    results = compare(redis_server.client(), jobs, fleet="n=1xH100-80GB",
                      policies=["static:smallest", "static:searched"], state_dir=tmp_path / "idle")
    for r in results:
        assert jct_floor(r) == r.summary()["jct_mean_s"] == 175
    figures = ratios(results)
    assert figures["jct_floor_vs_best_searched_static"] == 1.0
    assert figures["best_searched_static_wait_share"] == 0.0
    # two whole-GPU jobs at once on one GPU: one waits 100 s, so the mean JCT is 150 s against a
    # floor of 100 s, a third of it waiting
    jobs = [Job("a", 0, 100, ((80.0, 7),)), Job("b", 0, 100, ((80.0, 7),))]
    results = compare(redis_server.client(), jobs, fleet="n=1xH100-80GB", policies=["static:searched"],
                      state_dir=tmp_path / "busy")
    figures = ratios(results)
    assert figures["jct_floor_vs_best_searched_static"] == pytest.approx(100 / 150, abs=1e-4)
    assert figures["best_searched_static_wait_share"] == pytest.approx(50 / 150, abs=1e-4)


def _bench_scheduling():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scheduling", ROOT / "bench" / "scheduling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pod_list(path: Path, creation_times: list[float], num_gpu: int = 1) -> Path:
    rows = ["name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time"]
    for i, t in enumerate(creation_times):
        rows.append(f"pod-{i:05d},1000,1024,{num_gpu},500,,LS,Succeeded,{t:g},{t + 600:g},{t:g}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_scheduling_bench_lays_its_windows_out_on_any_pod_list(tmp_path):
    """The benchmark must run on a pod list a user passes in. Its day-based windows (tuning days
    115, 125, 135 and held-out windows after them) only fit the default list: on a list of another
    span it crashed (StopIteration), and on a sparse one every held-out window collapsed onto the
    last pod and reported 1.0 everywhere from one-job windows."""
    bench = _bench_scheduling()
    jobs = bench.JOBS

    def pods_from(times: list[float], start: float) -> int:
        return sum(1 for t in times if t >= start)

    starts, tuning, held_out, layout = bench.plan_windows(TRACE, jobs)
    assert tuning == ["115", "125", "135"] and len(held_out) == 5 and layout.startswith("by day")
    times = bench.pod_times(TRACE)
    assert len({starts[n] for n in held_out}) == 5 and all(pods_from(times, starts[n]) >= jobs for n in held_out)

    # a pod list of another span (ten days, 3,000 GPU pods): nothing of it was tuned on
    other = _pod_list(tmp_path / "other.csv", [i * 288.0 for i in range(3000)])
    starts, tuning, held_out, layout = bench.plan_windows(other, jobs)
    assert tuning == [] and len(held_out) == 5 and layout.startswith("by position")
    firsts = sorted(round(starts[n] / 288.0) for n in held_out)
    assert firsts[0] == 0 and firsts[-1] == 3000 - jobs
    assert all(b - a >= jobs for a, b in zip(firsts, firsts[1:]))  # windows of `jobs` pods that do not overlap

    # fewer pods than one window: one window of all of them
    small = _pod_list(tmp_path / "small.csv", [i * 60.0 for i in range(40)])
    starts, tuning, held_out, _ = bench.plan_windows(small, jobs)
    assert tuning == [] and held_out == ["pods:0"] and starts["pods:0"] == 0

    # no GPU pod at all: a clear error, before anything runs
    cpu_only = _pod_list(tmp_path / "cpu.csv", [0.0, 60.0], num_gpu=0)
    with pytest.raises(SystemExit, match="no GPU pod that ran"):
        bench.plan_windows(cpu_only, jobs)
