"""``prefect-mig demo``: the README's main job, on the embedded defaults.

1. Starts a private redis-server under the state dir (stopped at the end).
2. Carves a simulated fleet (2x H100-80GB unless a GPU answers: then it only reads the GPU) through
   the same GPU backend that carves real GPUs, and shows that a busy slice is never destroyed.
3. Publishes the inventory with the node agent.
4. Runs ``flows/demo_pipeline.py`` on an ephemeral Prefect API (or PREFECT_API_URL's): a fan-out of
   1g inference tasks and a 3g fine-tune at a higher priority, each body in a container of the local
   Docker engine bound to its slice.
5. Prints which task ran on which slice, how long it waited, and slice utilization.
"""

from __future__ import annotations

import os
import runpy
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table

from prefect_mig.cli.output import cli_errors, console
from prefect_mig.errors import ConfigError, InstanceBusy
from prefect_mig.gpu import backend_from_settings, nvml_available
from prefect_mig.gpu.host_lock import hold_gpus
from prefect_mig.model import Layout, enumerate_layouts, get_model
from prefect_mig.settings import load_settings
from prefect_mig.state_dir import private_dir, private_files

#: What the demo carves on each simulated H100-80GB: a mixed layout, and 2g + 2g + 3g.
DEMO_LAYOUTS = ["3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6", "2g.20gb@0 + 2g.20gb@2 + 3g.40gb@4"]
PIPELINE = Path(__file__).resolve().parents[2] / "flows" / "demo_pipeline.py"


def demo(
    fleet: Annotated[str | None, typer.Option(help="Simulated fleet spec (default: PREFECT_MIG_SIMULATED_FLEET).")] = None,
    batches: Annotated[int, typer.Option(min=1, max=200, help="Inference tasks to fan out.")] = 9,
    pipeline: Annotated[bool, typer.Option(help="Run the Prefect pipeline (needs Docker and the image).")] = True,
) -> None:
    """Run the demo on the embedded defaults (a simulated fleet when this host has no GPU)."""
    with cli_errors():
        overrides = {"backend": "simulated"} if not nvml_available() else {}
        if fleet:
            overrides["simulated_fleet"] = fleet
        settings = load_settings(**overrides)
        _refuse_beside_a_local_cluster(settings)
        console.print(Panel.fit("prefect-mig demo: MIG slices leased to Prefect tasks, bodies in containers bound to them"))
        for name in ("H100-80GB", "A30-24GB"):
            console.print(
                f"{name}: {len(enumerate_layouts(get_model(name)))} maximal layouts with the classic profiles "
                f"(`prefect-mig layouts {name}`)"
            )
        if settings.backend != "simulated":
            console.print("[yellow]A real GPU answers: the demo reads it and runs on its current layout.[/yellow]")
        fleet_spec = settings.fleet()
        node = fleet_spec.node_names[0] if settings.backend == "simulated" else settings.node
        backend = backend_from_settings(settings, node=node)
        with backend, hold_gpus(backend, settings, "prefect-mig demo", node=node) as held:
            if settings.backend == "simulated":
                console.print(f"[yellow]No GPU here: simulated fleet[/yellow] {fleet_spec} (state in {settings.state_dir})")
                _carve(backend)
            if not pipeline:
                return
            _run_pipeline(backend, node, settings, batches, held)


def _refuse_beside_a_local_cluster(settings) -> None:
    """The demo carves this host's (or the simulated) GPUs and publishes them to a Redis of its own:
    a local cluster of the same state dir would re-carve them under it (and, on real GPUs, grant
    the same slices as the demo)."""
    from prefect_mig.local_cluster import LocalCluster

    running = LocalCluster(settings).pid()
    if running is not None:
        raise ConfigError(
            f"a local cluster runs on this state dir ({settings.state_dir}, supervisor pid {running}): its node "
            "agent and repartitioner would re-carve the GPUs the demo carves and publishes to its own Redis, "
            "so the demo's tasks could wait for good. Stop it first (`prefect-mig down`), or give the demo "
            "another PREFECT_MIG_STATE_DIR.",
            field="state_dir",
            value=str(settings.state_dir),
        )


def _carve(backend) -> None:
    with Progress(console=console, transient=True) as progress:
        count = backend.gpu_count()
        job = progress.add_task("carving the simulated GPUs", total=count)
        for index in range(count):
            model = backend.gpu_model(index)
            text = DEMO_LAYOUTS[index % len(DEMO_LAYOUTS)] if model.name == "H100-80GB" else ""
            target = Layout.parse(model.name, text) if text else Layout(gpu_model=model.name)
            try:
                destroyed, created = backend.apply_layout(index, target)
            except InstanceBusy as exc:
                console.print(f"[red]kept GPU {index} as it is:[/red] {exc}")
                destroyed, created = [], []
            progress.advance(job)
            console.print(f"GPU {index}: {backend.layout(index)}  ({len(created)} created, {len(destroyed)} destroyed, the rest kept)")
    busy = backend.instances(0)[-1]
    backend.nvml.attach_process(busy.mig_uuid, pid=os.getpid())
    try:
        backend.destroy(0, busy.gpu_instance_id)
    except InstanceBusy as exc:
        console.print(f"[green]A busy slice is never destroyed:[/green] {exc}")
    finally:
        backend.nvml.detach_process(busy.mig_uuid, pid=os.getpid())


def _run_pipeline(backend, node: str, settings, batches: int, held) -> None:
    from prefect_mig.agent import NodeAgent
    from prefect_mig.allocator import Allocator
    from prefect_mig.launchers.images import DockerEngineError, docker_client, ensure_python_image
    from prefect_mig.testing.redis_server import RedisServer

    if not PIPELINE.exists():
        raise ConfigError(f"the demo pipeline {PIPELINE} is not here: run the demo from a checkout of prefect-mig.")
    try:
        image = ensure_python_image(docker_client(settings.docker_host), progress=lambda msg: console.print(msg))
    except DockerEngineError as exc:
        raise ConfigError(f"the demo needs the local Docker engine and its Python image: {exc}") from exc
    namespace = "demo"
    # Private, as everything under a state dir: redis-server's AOF and log, and Prefect's database
    # (its ephemeral API is a child process). Set after the image is ensured: a build needs readable files.
    with private_files(), RedisServer(dir=private_dir(Path(settings.state_dir) / "demo-redis")) as server:
        console.print(f"private redis-server on {server.url} (AOF on; stopped when the demo ends)")
        client = server.client()
        for key in client.scan_iter(match=f"pmig:{{{namespace}}}:*"):
            client.delete(key)  # a fresh run every time
        allocator = Allocator(client, namespace)
        agent = NodeAgent(backend, allocator, node=node, docker_url=settings.docker_host, gpu_locks=held)
        published = agent.publish()
        console.print(f"node agent published {published[0]} slices of {node}")
        # The agent keeps heartbeating while the pipeline runs, as `prefect-mig agent` does on a real
        # host: a node whose heartbeat lapses gets no grants (Prefect's API alone may take 30 s to start).
        stop_agent = threading.Event()
        heartbeat = threading.Thread(
            target=agent.run, kwargs={"interval_s": 2.0, "stop": stop_agent}, name="demo-agent", daemon=True
        )
        heartbeat.start()
        os.environ.update(
            {
                "PREFECT_MIG_REDIS_URL": server.url,
                "PREFECT_MIG_NAMESPACE": namespace,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
            }
        )
        if not os.environ.get("PREFECT_API_URL"):
            os.environ.setdefault("PREFECT_HOME", str(Path(settings.state_dir) / "prefect-home"))
            # Prefect's 20 s default is too short for a first start on a small, busy machine.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
            console.print("no PREFECT_API_URL: Prefect starts an ephemeral API for this run")
        flow_module = runpy.run_path(str(PIPELINE), run_name="mig_demo_pipeline")
        console.print(f"running the pipeline: 1 fine-tune on 3g.40gb (priority 9), {batches} inference batches on 1g.10gb (priority 3)")
        started = time.time()
        try:
            results = flow_module["demo_pipeline"](batches=batches)
        finally:
            stop_agent.set()
            heartbeat.join(timeout=30)
        wall = time.time() - started
        status = allocator.status()
        rows, utilization, span = flow_module["summarize"](results, status["slices"], allocator.events())
        from prefect_mig.integrations.prefect.artifacts import latest_artifact_key

        artifact = latest_artifact_key()

    table = Table(title=f"which task ran where (flow {wall:.1f} s, task bodies over {span:.1f} s)")
    for col in ("task", "slice", "waited s", "ran s"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    util = Table(title="slice utilization while bodies ran")
    util.add_column("slice")
    util.add_column("busy")
    for name, share in utilization.items():
        util.add_row(name, f"{share:.0%}")
    console.print(util)
    console.print(f"leases left: {len(status['leases'])}, waiting: {len(status['queue'])}; image {image}")
    if artifact:
        console.print(f"the flow run's table artifact: {artifact} (Prefect UI: Artifacts)", highlight=False)
