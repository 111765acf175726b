"""``prefect-mig layouts MODEL``: every maximal MIG layout of a GPU model, drawn as slice bars."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.model import enumerate_layouts, get_model, render_bar, select_profiles


def layouts(
    gpu_model: Annotated[str, typer.Argument(help="GPU model, e.g. H100-80GB (see `prefect-mig models`).")],
    profiles: Annotated[
        str,
        typer.Option(
            "--profiles",
            "-p",
            help="'classic' (1/2/3/4/7g), 'all' (with +me and the 2-slice 1g), or a comma-separated list.",
        ),
    ] = "classic",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List every maximal valid MIG layout of GPU_MODEL."""
    with cli_errors():
        model = get_model(gpu_model, field="GPU_MODEL")
        chosen: str | list[str] = profiles if profiles in ("classic", "all") else [
            name.strip() for name in profiles.split(",") if name.strip()
        ]
        used = select_profiles(model, chosen)
        found = enumerate_layouts(model, chosen)
        if as_json:
            print_json(
                {
                    "gpu_model": model.name,
                    "profiles": [p.name for p in used],
                    "count": len(found),
                    "layouts": [
                        {
                            "layout": str(layout),
                            "instances": [p.model_dump() for p in layout.instances],
                            "profile_counts": layout.profile_counts(),
                            "used_memory_slices": layout.used_slices(model),
                        }
                        for layout in found
                    ],
                }
            )
            return
        table = Table(
            title=f"{len(found)} maximal layouts of {model.name} "
            f"({model.memory_slices} memory slices; profiles: {', '.join(p.name for p in used)})"
        )
        table.add_column("#", justify="right")
        table.add_column("memory slices 0.." + str(model.memory_slices - 1), no_wrap=True)
        table.add_column("layout")
        for i, layout in enumerate(found, 1):
            table.add_row(str(i), render_bar(model, layout.instances), str(layout))
        console.print(table)


def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the GPU models in the catalog and their MIG profiles."""
    from prefect_mig.model import catalog

    cat = catalog()
    if as_json:
        print_json({name: m.model_dump(mode="json") for name, m in cat.models.items()})
        return
    table = Table(title="GPU models in the catalog")
    for col in ("model", "device name", "slices (mem/compute)", "profiles", "confidence"):
        table.add_column(col)
    for m in cat.models.values():
        table.add_row(
            m.name, m.device_name, f"{m.memory_slices}/{m.compute_slices}", ", ".join(m.profile_names), m.confidence
        )
    console.print(table)
