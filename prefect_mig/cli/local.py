"""``prefect-mig up`` and ``prefect-mig down``: the local cluster in one command (see
`prefect_mig.local_cluster`)."""

from __future__ import annotations

from typing import Annotated

import typer

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.settings import load_settings


def up(
    no_repartition: Annotated[bool, typer.Option("--no-repartition", help="Do not run the repartition service.")] = False,
    layout: Annotated[
        str | None, typer.Option(help="Layout config for GPUs with no instances (default: the layouts file's default).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between the agents' heartbeats.", min=0.1)] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Start (or find) the embedded Redis, this host's node agent and the repartitioner in the background."""
    from prefect_mig.allocator.connection import redacted
    from prefect_mig.allocator.embedded import embedded_dir, redis_url
    from prefect_mig.cli.leases import _allocator
    from prefect_mig.local_cluster import LocalCluster, local_nodes

    with cli_errors():
        settings = load_settings()
        configs = settings.layout_configs()
        chosen = layout or settings.layout or configs.default
        if chosen != "none":
            configs.layout_for(chosen, gpu_model="A30-24GB", node="", gpu_index=0)  # an unknown name fails first
        url = redacted(redis_url(settings))  # the embedded URL carries its password
        allocator = _allocator()
        local = LocalCluster(settings)
        pid, started = local.ensure(repartition=not no_repartition, layout=layout, interval_s=interval)
        nodes = local_nodes(settings)
        local.wait_for_agents(allocator, nodes)
        gpus = [g for g in allocator.gpus() if g.get("node") in nodes]
        report = {
            "redis_url": url,
            "redis": "configured (PREFECT_MIG_REDIS_URL)" if settings.redis_url else f"embedded, data in {embedded_dir(settings.state_dir)}",
            "namespace": settings.namespace,
            "state_dir": str(settings.state_dir),
            "supervisor_pid": pid,
            "started": started,
            "log": str(local.log_file),
            "nodes": nodes,
            "repartitioner": local.runs_repartitioner(),
            "gpus": [{"node": g.get("node"), "index": g.get("index"), "gpu_model": g.get("gpu_model"), "layout": g.get("layout")} for g in gpus],
        }
        if as_json:
            print_json(report)
            return
        console.print(
            f"[green]local cluster {'started' if started else 'already running'}[/green] (supervisor pid {pid})\n"
            f"  redis:         {url} ({report['redis']}), namespace {settings.namespace}\n"
            f"  node agent(s): {', '.join(nodes)}, heartbeating every {interval:g} s\n"
            f"  repartitioner: {'on' if report['repartitioner'] else 'off'}\n"
            f"  log:           {local.log_file}",
            highlight=False,
        )
        for g in report["gpus"]:
            console.print(f"  {g['node']} GPU {g['index']} {g['gpu_model']}: {g['layout'] or '(no instances)'}", highlight=False)
        console.print("see it: prefect-mig status; stop it: prefect-mig down", highlight=False)


def down(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Stop the background node agent(s) and repartitioner, and the embedded Redis."""
    from prefect_mig.allocator.embedded import stop_embedded_redis
    from prefect_mig.local_cluster import LocalCluster

    with cli_errors():
        settings = load_settings()
        live = _live_leases(settings)
        agents = LocalCluster(settings).stop()
        redis_stopped = settings.redis_url is None and stop_embedded_redis(settings.state_dir)
        if as_json:
            print_json({"agents_stopped": agents, "redis_stopped": redis_stopped,
                        "live_leases": live if redis_stopped else []})
            return
        console.print(
            ("stopped the background agent(s) and repartitioner" if agents else "no background agent was running")
            + ("; stopped the embedded redis-server" if redis_stopped else ""),
            highlight=False,
        )
        if live and redis_stopped:
            holders = ", ".join(f"{row.get('holder') or '?'} on {row.get('slice') or '?'}" for row in live)
            console.print(
                f"warning: {len(live)} live lease(s) went with it ({holders}): a task that held one has its "
                "container stopped once its lease can no longer be renewed, and fails", highlight=False,
            )


def _live_leases(settings) -> list[dict]:
    """The leases held on the embedded Redis, read before `down` stops it ([] when it does not run
    or cannot say: `down` stops what it can all the same)."""
    from prefect_mig.allocator.embedded import running_embedded_url
    from prefect_mig.errors import PrefectMigError

    if settings.redis_url is not None or running_embedded_url(settings.state_dir) is None:
        return []
    from prefect_mig.cli.leases import _allocator

    try:
        return _allocator().status()["leases"]
    except PrefectMigError:
        return []
