"""``prefect-mig simulate``: replay a trace (or a synthetic workload) under several policies."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.errors import ConfigError

DEFAULT_TRACE = "../shared/traces/alibaba-gpu-v2023/openb_pod_list_default.csv"


def simulate(
    trace: Annotated[Path | None, typer.Option(help="Pod list CSV in the Alibaba 2023 format.")] = None,
    synthetic_jobs: Annotated[int, typer.Option("--synthetic", help="Use N made-up jobs instead of a trace.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic workload (a trace replay draws nothing).")] = 0,
    fleet: Annotated[str, typer.Option(help="Fleet spec: node=NxMODEL,...")] = "sim-0=8xH100-80GB",
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="whole-gpu, sharing, static:smallest|mixed|fitted|searched|<layout>, proportional, dynamic, dynamic:mix (repeat it to compare several, each named once).",
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="How many GPU pods of the trace to replay.")] = 500,
    start_day: Annotated[float, typer.Option(help="Replay pods created from this trace day on.")] = 115.0,
    max_duration: Annotated[float | None, typer.Option(help="Cap each run time at this many seconds.")] = 7200.0,
    speedup: Annotated[float, typer.Option(help="Replay arrivals this many times faster (load the fleet).")] = 8.0,
    mapping: Annotated[str, typer.Option(help="Pod share to MIG slice: v100 or share.")] = "v100",
    profiles: Annotated[str, typer.Option(help="Profiles layouts use: classic, extended (each model's classic ones plus its 2-slice 1g, e.g. 1g.20gb) or all.")] = "extended",
    reconfig_cost: Annotated[float, typer.Option(help="Seconds a re-carved range is out of service.")] = 10.0,
    value_by: Annotated[str, typer.Option(help="What a served request is worth to the dynamic planner: request (one each) or dominant (its slice's dominant share of the GPU).")] = "request",
    out: Annotated[Path, typer.Option(help="Folder for simulation.json and simulation.png.")] = Path("simulation-out"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON summary only.")] = False,
) -> None:
    """Replay a workload on a simulated fleet under each policy, on the real allocator and planner.

    Prints mean job completion time, queue wait, makespan and utilization per policy, writes
    simulation.json (with the command, seed, knobs and the trace's SHA-256) and simulation.png
    (utilization, and queue depth per slice kind for each policy) into --out.
    """
    from prefect_mig.repartition.planner import Knobs, profile_set, value_by_choice
    from prefect_mig.simulation.policies import parse_policy
    from prefect_mig.simulation.report import DEFAULT_POLICIES, compare, fleet_model, plot, provenance, summary
    from prefect_mig.simulation.workload import MAPPINGS, load_trace, synthetic
    from prefect_mig.testing.redis_server import RedisServer

    with cli_errors():
        for flag, value in (("--speedup", speedup), ("--start-day", start_day), ("--max-duration", max_duration),
                            ("--reconfig-cost", reconfig_cost)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag}: {value!r} must be a finite number.", field=flag, value=value)
        if speedup <= 0:
            raise ConfigError(f"--speedup: {speedup!r} must be above 0.")
        if synthetic_jobs < 0:
            raise ConfigError(f"--synthetic: {synthetic_jobs!r} must be 0 or more (0: replay --trace).",
                              field="--synthetic", value=synthetic_jobs)
        if jobs < 1:
            raise ConfigError(f"--jobs: {jobs!r} must be at least 1.", field="--jobs", value=jobs)
        if mapping not in MAPPINGS:  # checked for --synthetic too, which has no use for it, rather than ignored
            raise ConfigError(f"--mapping: {mapping!r} is not a mapping; choose one of {', '.join(MAPPINGS)}.",
                              field="--mapping", value=mapping)
        if max_duration is not None and max_duration <= 0:
            raise ConfigError(f"--max-duration: {max_duration!r} must be above 0 seconds.")
        if reconfig_cost < 0:
            raise ConfigError(f"--reconfig-cost: {reconfig_cost!r} must be 0 seconds or more.")
        _check_out(out)
        knobs = Knobs(profiles=profile_set(profiles, field="--profiles"), value_by=value_by_choice(value_by, field="--value-by"))
        from prefect_mig.model import FleetSpec

        spec = FleetSpec.parse(fleet)
        model = fleet_model(spec)
        # stripped, as parse_policy strips them: " sharing" was refused as "'sharing' is not a policy"
        policy = [name.strip() for name in policy or ()]
        repeated = next((name for i, name in enumerate(policy) if name in policy[:i]), None)
        if repeated is not None:  # a replay is deterministic: a second run would only repeat the first
            raise ConfigError(f"--policy: {repeated!r} is named more than once; name each policy once.",
                              field="--policy", value=repeated)
        for name in policy:  # a typo fails here, not after a long trace was read
            # these three are their names alone (each needs only the workload, which is read next)
            if name not in ("static:searched", "sharing", "static:fitted"):
                parse_policy(name, model, knobs=knobs)
        if synthetic_jobs:
            workload = synthetic(jobs=synthetic_jobs, gpu_model=model, seed=seed)
            source = f"synthetic ({synthetic_jobs} jobs)"
        else:
            path = trace or Path(DEFAULT_TRACE)
            if trace is None and not path.is_file():
                raise ConfigError(
                    f"--trace: not given, and the default trace {DEFAULT_TRACE!r} is not there (it is looked up from "
                    f"the working directory, {Path.cwd()}); pass --trace with a pod list CSV in the Alibaba 2023 "
                    "format (openb_pod_list_default.csv of Alibaba's cluster-trace-gpu-v2023), or --synthetic N "
                    "for made-up jobs.",
                    field="--trace", value=None,
                )
            workload = load_trace(
                path, mapping=mapping, gpu_model=model, start_s=start_day * 86400, jobs=jobs, max_duration_s=max_duration
            )
            workload = [dataclasses.replace(j, arrival_s=j.arrival_s / speedup) for j in workload]
            source = str(path)
        if not workload:
            raise ConfigError("the workload is empty: no GPU pod in the trace window (check --trace and --start-day).")
        names = policy or list(DEFAULT_POLICIES)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=as_json, transient=False,
        ) as bar, RedisServer() as server, tempfile.TemporaryDirectory() as state_dir:
            tasks = {n: bar.add_task(f"{n:<18}", total=len(workload)) for n in names}
            results = compare(
                server.client(), workload, fleet=str(spec), policies=names, knobs=knobs, state_dir=state_dir,
                reconfig_cost_s=reconfig_cost,
                progress=lambda n, done, total: bar.update(tasks[n], completed=done),
            )
            for n in names:
                bar.update(tasks[n], completed=len(workload))
        doc = summary(
            results, workload=source, jobs=len(workload), fleet=str(spec), mapping=mapping,
            speedup=speedup, max_duration_s=max_duration, profiles=profiles, reconfig_cost_s=reconfig_cost,
            **provenance(
                command=[
                    "prefect-mig", "simulate",
                    *(["--synthetic", str(synthetic_jobs), "--seed", str(seed)] if synthetic_jobs else
                      ["--trace", source, "--jobs", str(jobs), "--start-day", f"{start_day:g}"]),
                    "--fleet", str(spec), *[a for n in names for a in ("--policy", n)],
                    *(["--max-duration", f"{max_duration:g}"] if max_duration is not None else []),
                    "--speedup", f"{speedup:g}", "--mapping", mapping, "--profiles", profiles,
                    "--value-by", value_by, "--reconfig-cost", f"{reconfig_cost:g}", "--out", str(out),
                ],
                seed=seed if synthetic_jobs else None, knobs=knobs, trace=None if synthetic_jobs else source,
                start_day=start_day,
            ),
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "simulation.json").write_text(json.dumps(doc, indent=2))
            plot(results, out / "simulation.png", title=f"{source} on {spec}")
        except OSError as exc:  # what the up-front check cannot see (e.g. a read-only file system)
            raise ConfigError(f"--out={str(out)!r}: cannot write there ({exc.strerror}); name a folder you can write to.",
                              field="out", value=str(out)) from exc
    if as_json:
        print_json(doc)
        return
    table = Table(title=f"{len(workload)} jobs from {source} on {spec}")
    for col in ("policy", "mean JCT s", "p95 JCT s", "mean wait s", "makespan / LB", "leased util", "re-carves", "rejected %"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for row in doc["policies"]:
        table.add_row(
            row["policy"], f"{row['jct_mean_s'] or 0:,.0f}", f"{row['jct_p95_s'] or 0:,.0f}",
            f"{row['wait_mean_s'] or 0:,.0f}", f"{row['makespan_vs_lower_bound'] or 0:.3f}",
            f"{row['utilization_leased']:.2f}", str(row["reconfigurations"]),
            f"{100 * row['rejection_rate']:.0f} % (not a baseline)" if row["rejected"] else "0",
        )
    console.print(table)
    classes = sorted({int(k) for row in doc["policies"] for k in row["by_priority"]}, reverse=True)
    by_class = Table(title="mean JCT s (mean wait s) by priority class")
    by_class.add_column("policy")
    for c in classes:
        by_class.add_column(f"priority {c}", justify="right")
    for row in doc["policies"]:
        cells = []
        for c in classes:
            got = row["by_priority"].get(str(c))
            cells.append(f"{got['jct_mean_s']:,.0f} ({got['wait_mean_s']:,.0f})" if got and got["jobs"] else "-")
        by_class.add_row(row["policy"], *cells)
    console.print(by_class)
    console.print(f"mapping: {mapping} (see prefect_mig/simulation/workload.py); multi-GPU pods run as independent parts")
    console.print(
        f"dynamic / whole-gpu JCT: {doc['jct_ratio_vs_whole_gpu']}   dynamic / best static ({doc['best_static']}): "
        f"{doc['jct_ratio_vs_best_static']}   dynamic / searched static: {doc['jct_ratio_vs_best_searched_static']}   "
        f"dynamic / sharing: {doc['jct_ratio_vs_sharing']}   makespan / lower bound: {doc['makespan_vs_lower_bound']}"
    )
    console.print(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be a writable folder, before a run that may take minutes."""
    import os

    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out={str(out)!r}: {existing} is a file; name a folder that exists or can be created.",
                          field="out", value=str(out))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out={str(out)!r}: {existing} is not writable; name a folder you can write to.",
                          field="out", value=str(out))
