"""``prefect-mig gpus``: the GPUs this host (or the simulated fleet) has, and their MIG layouts."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.gpu import GpuBackend, backend_from_settings, resolve_backend
from prefect_mig.model import creatable_profiles, render_bar
from prefect_mig.settings import Settings, load_settings


def inventory(backend: GpuBackend, node: str) -> list[dict[str, Any]]:
    """One record per GPU of `backend`: identity, MIG mode, instances and what can still be created."""
    found = []
    for gpu in backend.gpus():
        record: dict[str, Any] = {"node": node, **gpu.model_dump(), "instances": [], "creatable": []}
        if gpu.mig_enabled:
            model = backend.gpu_model(gpu.index)
            instances = backend.instances(gpu.index)
            record["instances"] = [m.model_dump() for m in instances]
            record["layout"] = str(backend.layout(gpu.index))
            record["bar"] = render_bar(model, [m.placement for m in instances])
            record["creatable"] = creatable_profiles(model, [m.placement for m in instances])
        found.append(record)
    return found


def node_backends(settings: Settings, node: str | None) -> tuple[str, list[tuple[str, GpuBackend]]]:
    """("nvml" | "simulated", [(node name, backend)]) for the nodes the command should show."""
    kind = resolve_backend(settings)
    if kind == "nvml":
        return kind, [(settings.node, GpuBackend())]
    fleet = settings.fleet()
    if node is not None:
        fleet.gpu_models(node)  # raises InvalidFleetSpec naming the fleet's nodes
    names = [node] if node else fleet.node_names
    return kind, [(n, backend_from_settings(settings.model_copy(update={"backend": "simulated"}), node=n)) for n in names]


def gpus(
    node: Annotated[str | None, typer.Option(help="Only this node of the simulated fleet.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show the GPUs, their MIG mode and layout, and which profiles can still be created."""
    with cli_errors():
        settings = load_settings()
        kind, backends = node_backends(settings, node)
        records = []
        for name, backend in backends:
            with backend:
                records.extend(inventory(backend, name))
        if as_json:
            print_json({"backend": kind, "fleet": settings.simulated_fleet if kind == "simulated" else None, "gpus": records})
            return
        if kind == "simulated":
            console.print(
                f"[yellow]No GPU driver in use: showing the simulated fleet[/yellow] {settings.simulated_fleet} "
                f"(state in {settings.state_dir})"
            )
        for r in records:
            mig = "MIG on" if r["mig_enabled"] else "[red]MIG off[/red]"
            console.print(
                f"[bold]{r['node']}[/bold] GPU {r['index']}  {r['gpu_model'] or r['device_name']}  "
                f"{r['uuid']}  {r['memory_total_mib']} MiB  {mig}",
                highlight=False,
            )
            if r["mig_enabled"]:
                console.print("  " + r["bar"], highlight=False)
                for m in r["instances"]:
                    console.print(
                        f"    {m['profile']}@{m['start']}  GI {m['gpu_instance_id']}  {m['mig_uuid']}",
                        highlight=False,
                    )
                console.print(f"  can still create: {', '.join(r['creatable']) or 'nothing'}", highlight=False)
