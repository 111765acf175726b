"""``prefect-mig demo``: the README's main job, on the embedded defaults.

Today it shows the foundation: the catalog's layouts, a simulated fleet carved into a mixed
layout through the same GPU backend that carves real GPUs, the refusal to destroy a busy slice,
and the fragmentation view. Later issues grow it into the full pipeline (leases, containers,
re-carving).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.panel import Panel
from rich.progress import Progress

from prefect_mig.cli.inventory import gpus as show_gpus
from prefect_mig.cli.output import cli_errors, console
from prefect_mig.errors import InstanceBusy
from prefect_mig.gpu import backend_from_settings, nvml_available
from prefect_mig.model import Layout, enumerate_layouts, get_model
from prefect_mig.settings import load_settings

#: What the demo carves on each simulated H100-80GB: a mixed layout and an all-1g one.
DEMO_LAYOUTS = ["3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6", "2g.20gb@0 + 2g.20gb@2 + 3g.40gb@4"]


def demo(
    fleet: Annotated[
        str | None, typer.Option(help="Simulated fleet spec (default: PREFECT_MIG_SIMULATED_FLEET).")
    ] = None,
) -> None:
    """Run the demo on the embedded defaults (a simulated fleet when this host has no GPU)."""
    with cli_errors():
        overrides = {"backend": "simulated"} if not nvml_available() else {}
        if fleet:
            overrides["simulated_fleet"] = fleet
        settings = load_settings(**overrides)
        console.print(Panel.fit("prefect-mig demo: MIG geometry, a simulated fleet, and the GPU backend"))

        for name in ("H100-80GB", "A30-24GB"):
            model = get_model(name)
            console.print(
                f"{name}: {len(enumerate_layouts(model))} maximal layouts with the classic profiles, "
                f"{len(enumerate_layouts(model, 'all'))} with every profile (`prefect-mig layouts {name}`)"
            )

        if settings.backend != "simulated":
            console.print("[yellow]A real GPU answers: the demo only reads it (no instance is created).[/yellow]")
            show_gpus(node=None, as_json=False)
            return

        fleet_spec = settings.fleet()
        console.print(f"[yellow]No GPU here: using the simulated fleet[/yellow] {fleet_spec} (state in {settings.state_dir})")
        node = fleet_spec.node_names[0]
        backend = backend_from_settings(settings, node=node)
        with backend, Progress(console=console, transient=True) as progress:
            count = backend.gpu_count()
            task = progress.add_task(f"carving {count} GPU(s) on {node}", total=count)
            for index in range(count):
                model = backend.gpu_model(index)
                text = DEMO_LAYOUTS[index % len(DEMO_LAYOUTS)] if model.name == "H100-80GB" else ""
                target = Layout.parse(model.name, text) if text else Layout(gpu_model=model.name)
                try:
                    destroyed, created = backend.apply_layout(index, target)
                except InstanceBusy as exc:
                    console.print(f"[red]kept GPU {index} as it is:[/red] {exc}")
                    destroyed, created = [], []
                progress.advance(task)
                console.print(
                    f"GPU {index}: {backend.layout(index)}  "
                    f"({len(created)} created, {len(destroyed)} destroyed, the rest kept)"
                )

            busy = backend.instances(0)[-1]
            nvml = backend.nvml
            nvml.attach_process(busy.mig_uuid, pid=os.getpid())
            try:
                backend.destroy(0, busy.gpu_instance_id)
            except InstanceBusy as exc:
                console.print(f"[green]A busy slice is never destroyed:[/green] {exc}")
            finally:
                nvml.detach_process(busy.mig_uuid, pid=os.getpid())

        show_gpus(node=node, as_json=False)
