"""The ``prefect-mig`` command: one typer app, one module per group of commands."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from prefect_mig import __version__
from prefect_mig.cli import demo as demo_cmd
from prefect_mig.cli import doctor as doctor_cmd
from prefect_mig.cli import inventory, layout_configs, layouts, leases, local, nodes, quotas, simulate
from prefect_mig.cli.image import image_app
from prefect_mig.cli.metrics import metrics_app
from prefect_mig.cli.report import report as report_cmd
from prefect_mig.cli.output import print_json

app = typer.Typer(
    name="prefect-mig",
    help="Leases on NVIDIA MIG slices for Prefect tasks, and layouts that follow the demand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@app.callback()
def _on_every_command() -> None:
    # SIGTERM (`kill`, a supervisor, systemd, a container stop) unwinds a command as Ctrl-C does,
    # so what it started is stopped on the way out: the demo's redis-server and Prefect API, a held
    # lease. Python's default would end the process on the spot and leave them running. Commands
    # with their own shutdown (`agent`, `up`'s supervisor, `api serve`) install their own handler.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


app.command("up")(local.up)
app.command("down")(local.down)
app.command("gpus")(inventory.gpus)
app.command("layouts")(layouts.layouts)
app.command("models")(layouts.models)
app.command("demo")(demo_cmd.demo)
app.command("doctor")(doctor_cmd.doctor)
app.command("status")(leases.status)
app.command("agent")(leases.agent)
app.command("simulate")(simulate.simulate)
app.command("report")(report_cmd)
app.add_typer(leases.lease_app, name="lease")
app.add_typer(leases.redis_app, name="redis")
app.add_typer(leases.api_app, name="api")
app.add_typer(leases.repartition_app, name="repartition")
app.add_typer(layout_configs.layout_app, name="layout")
app.add_typer(image_app, name="image")
app.add_typer(metrics_app, name="metrics")
app.add_typer(nodes.node_app, name="node")
app.add_typer(quotas.quota_app, name="quota")


@app.command("version")
def version(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Print prefect-mig's version (and those of the libraries it drives)."""
    from importlib.metadata import version as dist_version

    versions = {"prefect-mig": __version__}
    for dist in ("prefect", "nvidia-ml-py", "redis", "docker", "pydantic"):
        try:
            versions[dist] = dist_version(dist)
        except Exception:  # noqa: BLE001 - an absent optional library is just not listed
            continue
    if as_json:
        print_json(versions)
    else:
        typer.echo("  ".join(f"{k} {v}" for k, v in versions.items()))


if __name__ == "__main__":
    app()
