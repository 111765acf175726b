"""``prefect-mig layout list|apply``: named layout configs (mig-parted style) carved through the
node agents' desired-layout path."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.settings import load_settings

layout_app = typer.Typer(help="Named MIG layout configs (a YAML file, mig-parted style).", no_args_is_help=True)

FileOpt = Annotated[str | None, typer.Option("--file", "-f", help="Layouts file (default PREFECT_MIG_LAYOUTS_FILE or the shipped one).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _configs(file: str | None):
    from prefect_mig.model.layout_configs import LayoutConfigs

    settings = load_settings()
    return LayoutConfigs.load(file) if file else settings.layout_configs()


@layout_app.command("list")
def layout_list(file: FileOpt = None, as_json: JsonOpt = False) -> None:
    """List the configs of the layouts file and what each carves per GPU model."""
    from prefect_mig.model import catalog

    with cli_errors():
        configs = _configs(file)
        rows = []
        for name in configs.names():
            for model in catalog().models:
                layout = configs.layout_for(name, gpu_model=model, node="", gpu_index=0)
                if layout is not None:
                    rows.append({"config": name, "gpu_model": model, "layout": str(layout), "default": name == configs.default})
        if as_json:
            print_json({"source": configs.source, "default": configs.default, "configs": rows})
            return
        table = Table(title=f"layout configs in {configs.source} (default: {configs.default})")
        for col in ("config", "GPU model", "layout"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["config"], r["gpu_model"], r["layout"])
        console.print(table)


def plan_config(allocator, configs, name: str, *, node: str | None = None, gpu: int | None = None) -> list[dict]:
    """Per published GPU (of `node`, index `gpu`): the layout config `name` wants, and what is
    carved instead because busy (leased or unavailable) slices stay."""
    from prefect_mig.model import Layout, Placement, get_model
    from prefect_mig.model.layout_configs import keep_busy

    slices = allocator.status()["slices"]
    rows = []
    for g in allocator.gpus():
        if (node and g.get("node") != node) or (gpu is not None and g.get("index") != gpu):
            continue
        model = get_model(g["gpu_model"])
        mine = [s for s in slices if s["gpu_uuid"] == g["uuid"] and not s.get("gone")]
        current = Layout.of(model, [Placement(profile=s["profile"], start=s["start"]) for s in mine])
        busy = {Placement(profile=s["profile"], start=s["start"]) for s in mine if s["state"] in ("leased", "unavailable")}
        row = {"node": g.get("node"), "gpu": g.get("index"), "gpu_uuid": g["uuid"], "gpu_model": model.name,
               "current": str(current), "target": None, "carve": None, "kept": [], "left_out": [], "action": "none"}
        target = configs.layout_for(name, gpu_model=model.name, node=g.get("node", ""), gpu_index=g.get("index", 0))
        if target is None:
            row["action"] = f"no entry of {name!r} for {model.name}: left alone"
        else:
            carve, kept, left_out = keep_busy(model, target, busy)
            row.update(target=str(target), carve=str(carve), kept=[str(p) for p in kept], left_out=[str(p) for p in left_out])
            if set(carve.instances) != set(current.instances):
                row["action"] = "desire"
            elif kept or left_out:  # the config differs, but its busy slices hold the GPU as it is
                row["action"] = f"left as is: busy slices hold it ({', '.join(str(p) for p in kept)})"
            else:
                row["action"] = "already carved"
        rows.append(row)
    return rows


@layout_app.command("apply")
def layout_apply(
    config: Annotated[str, typer.Option("--config", "-c", help="Name of the layout config to carve.")],
    file: FileOpt = None,
    node: Annotated[str | None, typer.Option(help="Only this node's GPUs.")] = None,
    gpu: Annotated[int | None, typer.Option(help="Only the GPU with this index.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; desire nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Carve a named layout config through the node agents (busy slices are never destroyed)."""
    from prefect_mig.cli.leases import _allocator
    from prefect_mig.errors import ConfigError

    with cli_errors():
        configs = _configs(file)
        configs.layout_for(config, gpu_model="A30-24GB", node="", gpu_index=0)  # an unknown name fails first
        allocator = _allocator()
        rows = plan_config(allocator, configs, config, node=node, gpu=gpu)
        if not rows:
            published = sorted(f"{g.get('node')} GPU {g.get('index')}" for g in allocator.gpus())
            raise ConfigError(
                "no published GPU matches"
                + (f" --node {node}" if node else "") + (f" --gpu {gpu}" if gpu is not None else "")
                + (f"; published: {', '.join(published)}" if published else "; no GPU is published")
                + ". Is the node agent running (`prefect-mig up`, `prefect-mig status`)?",
                field="node" if node else "gpu",
                value=node or gpu,
            )
        from prefect_mig.allocator.health import agents as agent_health

        agents = agent_health(allocator)
        for r in rows:
            if r["action"] == "desire" and not dry_run:
                allocator.set_desired(r["gpu_uuid"], r["carve"], kind="incremental")
                r["action"] = "desired"
            r["agent_stale"] = agents.get(r["node"], {}).get("stale", True)
        if as_json:
            print_json({"config": config, "dry_run": dry_run, "gpus": rows})
            return
        for r in rows:
            console.print(f"[bold]{r['node']}[/bold] GPU {r['gpu']} ({r['gpu_model']}): {r['action']}", highlight=False)
            if r["carve"]:
                console.print(f"  now:   {r['current']}\n  carve: {r['carve']}", highlight=False)
            if r["kept"]:
                console.print(f"  kept (busy, not in {config}): {', '.join(r['kept'])}", highlight=False)
            if r["left_out"]:
                console.print(f"  left out (would overlap a busy slice): {', '.join(r['left_out'])}", highlight=False)
            if r["action"] == "desired":
                console.print(
                    "  the node's agent carves it on its next tick"
                    + (" [red](but its heartbeat is stale: is it running?)[/red]" if r["agent_stale"] else ""),
                    highlight=False,
                )
