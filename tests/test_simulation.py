"""The simulator: trace mapping, policies, and runs on the real allocator, planner and agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefect_mig.errors import ConfigError
from prefect_mig.repartition.planner import Knobs
from prefect_mig.simulation.engine import SimConfig, Simulator, lower_bound
from prefect_mig.simulation.policies import Policy, parse_policy
from prefect_mig.simulation.report import compare, ratios
from prefect_mig.simulation.workload import Job, best_fit, load_trace, need_of, synthetic

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "alibaba-gpu-v2023" / "openb_pod_list_default.csv"
HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n"


def test_the_v100_mapping_sizes_pods_by_memory_and_compute():
    assert best_fit(need_of(num_gpu=1, gpu_milli=1000, mapping="v100", gpu_model="H100-80GB")[0], "H100-80GB") == "1g.20gb"
    assert best_fit(need_of(num_gpu=1, gpu_milli=320, mapping="v100", gpu_model="H100-80GB")[0], "H100-80GB") == "1g.10gb"
    classic = ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")
    assert best_fit((16.0, 1), "H100-80GB", classic) == "2g.20gb"
    assert need_of(num_gpu=2, gpu_milli=1000, mapping="v100", gpu_model="H100-80GB") == [(32.0, 2)]
    # 8 V100s need 128 GB: more than one H100 holds, so two parts of half each
    assert need_of(num_gpu=8, gpu_milli=1000, mapping="v100", gpu_model="H100-80GB") == [(64.0, 4), (64.0, 4)]
    assert need_of(num_gpu=4, gpu_milli=1000, mapping="share", gpu_model="H100-80GB") == [(80.0, 7)] * 4
    with pytest.raises(ConfigError, match="mapping: 'memory'.*v100, share"):
        need_of(num_gpu=1, gpu_milli=500, mapping="memory", gpu_model="H100-80GB")


def test_a_trace_file_is_read_skipping_cpu_pods_and_unscheduled_ones(tmp_path):
    trace = tmp_path / "pods.csv"
    trace.write_text(
        HEADER
        + "p-cpu,1000,1024,0,0,,BE,Succeeded,10,20,10\n"
        + "p-never,1000,1024,1,500,,LS,Pending,11,50,\n"
        + "p-a,1000,1024,1,470,,LS,Succeeded,100,700,160\n"
        + "p-b,1000,1024,8,1000,,BE,Running,130,1130,130\n"
    )
    jobs = load_trace(trace)
    assert [j.name for j in jobs] == ["p-a", "p-b"]
    assert (jobs[0].arrival_s, jobs[0].duration_s, jobs[0].priority) == (0.0, 540.0, 10)
    assert (jobs[1].arrival_s, len(jobs[1].parts), jobs[1].priority) == (30.0, 2, 0)
    assert load_trace(trace, max_duration_s=100)[1].duration_s == 100


def test_a_trace_without_the_columns_is_refused_by_name(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("name,num_gpu\nx,1\n")
    with pytest.raises(ConfigError, match="lacks the column.*gpu_milli"):
        load_trace(trace)
    with pytest.raises(ConfigError, match="is not a file"):
        load_trace(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("row", "column", "value", "allowed"),
    [
        ("p1,1000,1024,one,500,,LS,Running,10,100,20", "num_gpu", "one", "a whole number"),
        ("p1,1000,1024,1,500,,LS,Running,abc,100,20", "creation_time", "abc", "a number"),
        ("p1,1000,1024,1,500,,LS,Running,10,later,20", "deletion_time", "later", "a number"),
        ("p1,1000,1024,1,-500,,LS,Running,10,100,20", "gpu_milli", "-500", "1 to 1000"),
        ("p1,1000,1024,-1,500,,LS,Running,10,100,20", "num_gpu", "-1", "0 or more"),
        ("p1,1000,1024,1,500,,LS,Running,10,100,20,extra", "row", "has 12 fields", "the header has 11"),
        ("p1,1000,1024,1", "row", "has 4 fields", "the header has 11"),
        ("p1,1000,1024,1,500,,LS,Running,10,15,20", "deletion_time", "15", "at or after scheduled_time"),
    ],
)
def test_a_bad_value_in_a_trace_is_refused_naming_the_file_line_column_and_what_is_allowed(tmp_path, row, column, value, allowed):
    trace = tmp_path / "pods.csv"
    trace.write_text(HEADER + "p0,1000,1024,1,500,,LS,Running,5,100,5\n" + row + "\n")
    with pytest.raises(ConfigError) as refused:
        load_trace(trace)
    message = str(refused.value)
    assert f"{trace}:3:" in message and allowed in message
    assert f"{column}={value!r}" in message if column != "row" else value in message


def test_policies_by_name_and_bad_names_list_what_is_allowed():
    assert parse_policy("static:3g.40gb@0+3g.40gb@4", "H100-80GB").layout_for(5) == "3g.40gb@0 + 3g.40gb@4"
    with pytest.raises(ConfigError, match="whole-gpu, dynamic, dynamic:mix, static:smallest"):
        parse_policy("round-robin", "H100-80GB")
    with pytest.raises(ConfigError, match="neither static:smallest"):
        parse_policy("static:3g.40gb@1", "H100-80GB")
    jobs = [Job("big", 0, 100, ((80.0, 7),)), *[Job(f"s{i}", 0, 100, ((10.0, 1),)) for i in range(30)]]
    fitted = parse_policy("static:fitted", "H100-80GB", jobs=jobs, gpus=3)
    assert "7g.80gb@0" in fitted.layouts  # the fitted mix still holds the biggest job


def _run(server, jobs, policy, fleet="n=1xH100-80GB", tmp_path=None, **config):
    return Simulator(
        server.client(), jobs, SimConfig(fleet=fleet, policy=parse_policy(policy, "H100-80GB", jobs=jobs, gpus=1), **config),
        state_dir=tmp_path,
    ).run()


def test_whole_gpus_serialize_small_jobs_that_mig_slices_run_side_by_side(redis_server, tmp_path):
    jobs = [Job(f"j{i}", 0, 100, ((10.0, 1),)) for i in range(7)]
    whole = _run(redis_server, jobs, "whole-gpu", tmp_path=tmp_path / "w")
    sliced = _run(redis_server, jobs, "static:smallest", tmp_path=tmp_path / "s")
    assert whole.makespan_s == 700 and sliced.makespan_s == 100
    assert [j.wait_s for j in whole.jobs] == [0, 100, 200, 300, 400, 500, 600]  # FIFO, one at a time
    assert sliced.summary()["utilization_leased"] == 1.0
    # the simulator leaves nothing behind in Redis
    assert not list(redis_server.client().scan_iter(match="pmig:{sim-*"))


def test_priority_and_order_come_from_the_allocator(redis_server, tmp_path):
    jobs = [Job("first", 0, 100, ((10.0, 1),)), Job("low", 1, 10, ((10.0, 1),), priority=0),
            Job("high", 2, 10, ((10.0, 1),), priority=10)]
    result = _run(redis_server, jobs, "whole-gpu", tmp_path=tmp_path)
    ends = {j.name: j.end_s for j in result.jobs}
    assert ends == {"first": 100, "high": 110, "low": 120}


def test_a_static_layout_rejects_jobs_no_slice_can_hold(redis_server, tmp_path):
    jobs = [Job("big", 0, 50, ((40.0, 3),)), Job("small", 0, 50, ((10.0, 1),))]
    result = _run(redis_server, jobs, "static:smallest", tmp_path=tmp_path)
    assert result.rejected == ["big"] and [j.name for j in result.finished] == ["small"]


def test_dynamic_re_carves_for_the_queue_and_beats_a_layout_that_does_not_fit(redis_server, tmp_path):
    """7x1g is the wrong layout for a queue of 3g jobs: the service re-carves it (through the
    agent and the simulated NVML), and the 3g jobs run two at a time instead of one by one on
    whatever the allocator finds."""
    jobs = [Job(f"t{i}", 0, 600, ((40.0, 3),)) for i in range(4)]
    config = dict(reconfig_cost_s=10.0, plan_interval_s=30.0)
    start = "static:1g.10gb@0+1g.10gb@1+1g.10gb@2+1g.10gb@3+1g.10gb@4+1g.10gb@5+1g.10gb@6"
    dyn = Simulator(
        redis_server.client(), jobs,
        SimConfig(fleet="n=1xH100-80GB", policy=Policy("dynamic", parse_policy(start, "H100-80GB").layouts, dynamic=True),
                  **config),
        state_dir=tmp_path,
    ).run()
    assert not dyn.unfinished and not dyn.violations and dyn.reconfigurations >= 1
    assert dyn.layouts_end == ["3g.40gb@0 + 3g.40gb@4"]
    # two at a time: 10 s re-carve, then two rounds of 600 s
    assert dyn.makespan_s == pytest.approx(30 + 10 + 1200, abs=31)
    assert dyn.makespan_s / dyn.lower_bound_s < 1.25


def test_the_service_re_carves_idle_whole_gpus_for_small_requests_before_they_take_whole_gpus(redis_server, tmp_path):
    """A fleet that starts as whole GPUs (a compute-heavy past) gets small requests while nothing
    waits. The live service plans between pipeline runs too: after the first small grant it
    re-carves the idle whole GPU into 1g.20gb slices, so the next small jobs run side by side at
    once. Planning only while requests wait, the second job took the whole idle GPU and the rest
    waited for the first two to end (hours)."""
    jobs = [Job("long", 0, 36_000, ((15.0, 1),))] + [Job(f"s{i}", 600 + 120 * i, 3_600, ((15.0, 1),)) for i in range(4)]

    def run(sub, **config):
        policy = Policy("dynamic", ("7g.80gb@0",), dynamic=True)
        return Simulator(redis_server.client(), jobs, SimConfig(fleet="n=2xH100-80GB", policy=policy,
                         knobs=Knobs(profiles="extended"), **config), state_dir=tmp_path / sub).run()

    idle = run("idle")
    assert not idle.unfinished and not idle.violations
    assert [j.wait_s for j in idle.jobs] == [0, 0, 0, 0, 0]
    assert any("1g.20gb" in layout for layout in idle.layouts_end)
    waiting_only = run("waiting", plan_while_idle=False)
    assert max(j.wait_s for j in waiting_only.jobs) >= 3_000


def test_compare_on_a_slice_of_the_alibaba_trace(redis_server, tmp_path):
    if not TRACE.is_file():
        pytest.fail(f"the Alibaba trace is missing at {TRACE} (../shared must sit beside the project)")
    jobs = load_trace(TRACE, start_s=115 * 86400, jobs=120, max_duration_s=3600)
    assert len(jobs) == 120 and lower_bound(jobs, 7) > 0
    results = compare(redis_server.client(), jobs, fleet="n=2xH100-80GB",
                      policies=["whole-gpu", "static:mixed", "dynamic"], state_dir=tmp_path)
    figures = ratios(results)
    assert all(not r.unfinished and not r.violations for r in results)
    assert figures["jct_ratio_vs_whole_gpu"] < 0.5
    assert 1.0 <= figures["makespan_vs_lower_bound"] <= 1.25
    json.dumps([r.summary() for r in results])  # the summary is JSON-ready


def test_synthetic_workloads_shift_their_mix():
    jobs = synthetic(jobs=300, seed=3)
    first = sum(p[1] for j in jobs[:100] for p in j.parts)
    last = sum(p[1] for j in jobs[-100:] for p in j.parts)
    assert last > 2 * first and jobs == synthetic(jobs=300, seed=3)


def test_the_simulate_command_writes_json_and_png(tmp_path):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--synthetic", "60", "--fleet", "n=2xH100-80GB",
                                      "--policy", "whole-gpu", "--policy", "dynamic", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "simulation.json").read_text())
    assert [p["policy"] for p in doc["policies"]] == ["whole-gpu", "dynamic"]
    assert (out / "simulation.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["simulate", "--synthetic", "5", "--policy", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "policy: 'nope'" in bad.output
    mixed = CliRunner().invoke(app, ["simulate", "--synthetic", "5", "--fleet", "a=1xH100-80GB,b=1xA30-24GB", "--out", str(out)])
    assert mixed.exit_code == 2 and "mixes GPU models (A30-24GB, H100-80GB)" in " ".join(mixed.output.split())
    negative = CliRunner().invoke(app, ["simulate", "--synthetic", "5", "--reconfig-cost", "-1", "--out", str(out)])
    assert negative.exit_code == 2 and "--reconfig-cost: -1.0 must be 0 seconds or more" in negative.output
    for flag in ("--reconfig-cost", "--speedup", "--max-duration", "--start-day"):  # NaN passed every check, or crashed
        for value in ("nan", "inf"):
            refused = CliRunner().invoke(app, ["simulate", "--synthetic", "5", flag, value, "--out", str(out)])
            assert refused.exit_code == 2 and f"{flag}: {float(value)!r}" in refused.output and "finite" in refused.output, refused.output


def test_simulate_refuses_an_unknown_policy_before_it_reads_the_trace(tmp_path):
    # a typo in --policy was refused only once the run started, after a long trace had been read
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--trace", str(tmp_path / "not-there.csv"), "--policy", "dynamic",
                                      "--policy", "dynamc", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "policy: 'dynamc' is not a policy" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_simulate_refuses_a_policy_named_twice_naming_it_before_it_reads_the_trace(tmp_path):
    # it ran the policy twice: the same results in two rows, and one progress bar left at 0
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--trace", str(tmp_path / "not-there.csv"), "--policy", "dynamic",
                                      "--policy", "whole-gpu", "--policy", " dynamic", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--policy: 'dynamic' is named more than once; name each policy once." in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_simulate_takes_the_comparison_policies_with_spaces_around_them_as_it_takes_the_others(tmp_path):
    # " sharing" was refused as "'sharing' is not a policy; choose ..., or, in a comparison, ... sharing"
    # while " dynamic" ran
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--synthetic", "10", "--fleet", "sim-0=1xA30-24GB", "--policy", " sharing",
                                      "--policy", "static:searched ", "--policy", " dynamic", "--json",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "simulation.json").read_text())
    assert [p["policy"] for p in doc["policies"]] == ["sharing", "static:searched", "dynamic"]
    assert "--policy sharing --policy static:searched --policy dynamic --" in doc["command"]


@pytest.mark.parametrize("under", ["", "sub"])
def test_simulate_refuses_an_out_that_cannot_be_a_folder_before_it_simulates(tmp_path, under):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    a_file = tmp_path / "taken"
    a_file.write_text("mine\n")
    out = a_file / under if under else a_file
    # --out is checked before --policy: the --out error coming first shows it is checked up front
    result = CliRunner().invoke(app, ["simulate", "--synthetic", "5", "--policy", "nope", "--out", str(out)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    message = " ".join(result.output.split())
    assert f"--out={str(out)!r}" in message and f"{a_file} is a file" in message
    assert a_file.read_text() == "mine\n"


def test_a_policy_that_rejects_jobs_is_not_a_baseline(redis_server, tmp_path):
    jobs = [Job("big", 0, 50, ((40.0, 3),)), *[Job(f"s{i}", 0, 50, ((10.0, 1),)) for i in range(6)]]
    results = compare(redis_server.client(), jobs, fleet="n=1xH100-80GB",
                      policies=["whole-gpu", "static:smallest", "static:mixed", "dynamic"], state_dir=tmp_path)
    by = {r.policy: r for r in results}
    assert by["static:smallest"].rejected == ["big"]
    # static:smallest finished its jobs fastest, but it rejected one: static:mixed is the best static
    assert ratios(results)["best_static"] == "static:mixed"
    # the lower bound counts only the jobs that ran
    assert by["static:smallest"].lower_bound_s == 50


def test_dynamic_mix_follows_the_static_mix_the_lease_history_asks_for(redis_server, tmp_path):
    """Started on 7x1g, a queue of 3g jobs (a kind the layout lacks) makes the dynamic policy
    search the mix for what it has seen and carve it: the 3g jobs run two at a time."""
    jobs = [Job(f"t{i}", 0, 600, ((40.0, 3),)) for i in range(4)]
    start = parse_policy("static:" + "+".join(f"1g.10gb@{i}" for i in range(7)), "H100-80GB").layouts
    policy = Policy("dynamic:mix", start, dynamic=True, mix_every=parse_policy("dynamic:mix", "H100-80GB").mix_every)
    dyn = Simulator(redis_server.client(), jobs, SimConfig(fleet="n=1xH100-80GB", policy=policy, plan_interval_s=30.0),
                    state_dir=tmp_path).run()
    assert not dyn.unfinished and not dyn.violations and dyn.reconfigurations == 1
    assert dyn.layouts_end == ["3g.40gb@0 + 3g.40gb@4"]
    assert dyn.makespan_s == pytest.approx(30 + 10 + 1200, abs=31)


def test_dynamic_policies_start_from_the_mix_of_the_history_before_the_window(redis_server, tmp_path):
    """A service that ran before the window has seen its past: with `history` of 3g jobs, dynamic
    starts carved for them and needs no re-carve, where cold the first 3g job takes the whole GPU
    at once and the others wait for it (draining it for two waiting requests does not pay the
    drain cost of a lease expected to run 600 s more) or for a re-carve."""
    jobs = [Job(f"t{i}", 0, 600, ((40.0, 3),)) for i in range(4)]
    history = [Job(f"h{i}", 0, 600, ((40.0, 3),)) for i in range(4)]
    cold, warm = (
        compare(redis_server.client(), jobs, fleet="n=1xH100-80GB", policies=["dynamic"], state_dir=tmp_path / name,
                history=past)[0]
        for name, past in (("cold", ()), ("warm", history))
    )
    assert warm.reconfigurations == 0 and warm.layouts_end == ["3g.40gb@0 + 3g.40gb@4"]
    assert warm.summary()["jct_mean_s"] < cold.summary()["jct_mean_s"]


def test_simulate_takes_what_a_served_request_is_worth_and_refuses_an_unknown_unit(tmp_path):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--synthetic", "20", "--fleet", "n=1xH100-80GB", "--policy", "dynamic",
                                      "--value-by", "dominant", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "simulation.json").read_text())
    assert doc["knobs"]["value_by"] == "dominant" and "--value-by dominant" in doc["command"]
    bad = CliRunner().invoke(app, ["simulate", "--synthetic", "5", "--value-by", "size", "--out", str(out)])
    assert bad.exit_code == 2 and "--value-by: 'size' is not allowed; choose request, dominant" in " ".join(bad.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--synthetic", "-3"], "--synthetic: -3 must be 0 or more (0: replay --trace)"),
        (["--jobs", "0"], "--jobs: 0 must be at least 1"),
        (["--synthetic", "5", "--mapping", "memory"], "--mapping: 'memory' is not a mapping; choose one of v100, share"),
    ],
)
def test_simulate_refuses_a_bad_count_or_mapping_naming_that_option_before_it_simulates(tmp_path, args, message):
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", *args, "--trace", str(tmp_path / "none.csv"), "--out", str(out)])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_simulate_without_a_trace_where_the_default_is_missing_says_what_to_pass(tmp_path, monkeypatch):
    # The README's first example gives no --trace; run from anywhere but beside ../shared it said only
    # "trace: '../shared/traces/...' is not a file", naming a path the operator never gave.
    from typer.testing import CliRunner

    from prefect_mig.cli.main import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["simulate", "--jobs", "5", "--out", str(tmp_path / "out")])
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "--trace: not given" in message and "looked up from the working directory" in message
    assert "--synthetic N" in message and "Alibaba 2023" in message
