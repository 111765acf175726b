"""``prefect-mig lease acquire|renew|release|list``, ``prefect-mig status`` and ``prefect-mig agent``.

With no ``PREFECT_MIG_REDIS_URL`` they use the embedded redis-server under the state dir (started on
first use, stopped by ``prefect-mig redis stop``).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from prefect_mig.allocator import Allocator, SliceRequest, health
from prefect_mig.allocator.allocator import check_ttl, check_wait
from prefect_mig.allocator.models import lease_row_numbers
from prefect_mig.allocator.connection import connect
from prefect_mig.allocator.embedded import running_embedded_url, stop_embedded_redis
from prefect_mig.cli.output import cli_errors, console, errors, print_error, print_json
from prefect_mig.cli.live import forget_advice
from prefect_mig.errors import ConfigError, PrefectMigError
from prefect_mig.gpu.host import require_host_pid_namespace
from prefect_mig.gpu.host_lock import hold_gpus
from prefect_mig.repartition.planner import Knobs, profile_set, value_by_choice
from prefect_mig.settings import load_settings

lease_app = typer.Typer(help="Acquire, renew, release and list leases.", no_args_is_help=True)
redis_app = typer.Typer(help="The embedded redis-server (used when PREFECT_MIG_REDIS_URL is unset).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _allocator() -> Allocator:
    settings = load_settings()
    return Allocator(
        connect(settings), settings.namespace, max_ttl_s=settings.lease_max_ttl_s,
        replicas=settings.redis_replicas, replica_timeout_s=settings.redis_replica_timeout_s,
        wait_ttl_s=settings.wait_ttl_s,
    )


#: SliceRequest field -> the `lease acquire` option that sets it
_OPTION = {"min_compute_slices": "--min-compute", "ttl_s": "--ttl"}


def _request(**fields) -> SliceRequest:
    try:
        return SliceRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # the request as a whole: neither a profile nor a minimum, or both
            words = {"profile='1g.10gb'": "--profile 1g.10gb", "min_memory_gb": "--min-memory-gb",
                     "min_compute_slices": "--min-compute", "an exact profile": "--profile"}
            message = first["msg"].removeprefix("Value error, ")
            for word, option in words.items():
                message = message.replace(word, option)
            raise ConfigError(message, field="profile", value=fields.get("profile")) from exc
        field = str(first["loc"][0])
        option = _OPTION.get(field, "--" + field.replace("_", "-"))
        raise ConfigError(
            f"{option}={first.get('input')!r}: {first['msg'].removeprefix('Value error, ')}",
            field=field,
            value=first.get("input"),
        ) from exc


@lease_app.command("acquire")
def acquire(
    profile: Annotated[str | None, typer.Option(help="Exact MIG profile, e.g. 1g.10gb.")] = None,
    min_memory_gb: Annotated[float | None, typer.Option(help="At least this much memory (GB).")] = None,
    min_compute: Annotated[int | None, typer.Option(help="At least this many compute slices.")] = None,
    gpu_model: Annotated[str | None, typer.Option(help="Only this GPU model.")] = None,
    node: Annotated[str | None, typer.Option(help="Only this node.")] = None,
    priority: Annotated[int, typer.Option(help="0 to 100; higher is served first.")] = 0,
    tenant: Annotated[str, typer.Option(help="Tenant charged for the slice.")] = "default",
    holder: Annotated[str, typer.Option(help="Who holds it.")] = "cli",
    ttl: Annotated[float, typer.Option(help="Lease TTL in seconds; renew with `lease renew`.")] = 300,
    preemptible: Annotated[bool, typer.Option(help="May be revoked for higher priority.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait (default: as long as it takes); 0 = fail if busy.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Acquire a slice and print its lease id and fencing token (the lease lives for --ttl)."""
    with cli_errors():
        check_wait(timeout, field="--timeout")  # before anything is asked of Redis: a refused wait holds nothing
        allocator = _allocator()
        check_ttl(ttl, allocator.max_ttl_s, field="--ttl")
        if gpu_model is not None:
            allocator.load_models()  # --gpu-model may name a model a node agent built from NVML
        request = _request(
            profile=profile, min_memory_gb=min_memory_gb, min_compute_slices=min_compute, gpu_model=gpu_model,
            node=node, priority=priority, tenant=tenant, holder=holder, ttl_s=ttl, preemptible=preemptible,
        )
        lease = allocator.acquire(request, timeout_s=timeout)
        if as_json:
            print_json(lease.model_dump())
            return
        s = lease.slice
        console.print(
            f"lease {lease.lease_id} fence {lease.fence}: {s.profile}@{s.start} on {s.node} GPU {s.gpu_index} "
            f"({s.mig_uuid}), expires in {ttl:g} s",
            highlight=False,
        )


@lease_app.command("renew")
def renew(
    lease_id: Annotated[str, typer.Argument(help="Lease id.")],
    fence: Annotated[int, typer.Option(help="The fencing token you were granted.")],
    ttl: Annotated[
        float | None,
        typer.Option(help="New TTL in seconds (1 to PREFECT_MIG_LEASE_MAX_TTL_S); default: the lease's own TTL."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Extend a lease by its own TTL (the one it was granted or last renewed with), or by --ttl."""
    with cli_errors():
        allocator = _allocator()
        if ttl is not None:
            check_ttl(ttl, allocator.max_ttl_s, field="--ttl")
        expires = allocator.renew(lease_id, fence, ttl)
        print_json({"lease_id": lease_id, "expires_at_ms": expires}) if as_json else console.print(f"renewed {lease_id}")


@lease_app.command("release")
def release(
    lease_id: Annotated[str, typer.Argument(help="Lease id.")],
    fence: Annotated[int, typer.Option(help="The fencing token you were granted.")],
    as_json: JsonOpt = False,
) -> None:
    """Release a lease (idempotent)."""
    with cli_errors():
        released = _allocator().release(lease_id, fence)
        if as_json:
            print_json({"lease_id": lease_id, "released": released})
        else:
            console.print(f"released {lease_id}" if released else f"{lease_id} was already gone")


@lease_app.command("revoke")
def revoke(
    lease_id: Annotated[str, typer.Argument(help="Lease id (`lease list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Take a lease back from its holder (an admin's tool; no fence needed). The holder is told at
    once and must stop, as when preempted; the slice goes to the next waiter when the holder
    releases it or its lease lapses (and its container is fenced), never while it may be in use.
    `lease release` with a fence is the holder's own release: the slice goes on at once."""
    with cli_errors():
        expires_at = _allocator().revoke(lease_id)
        if as_json:
            print_json({"lease_id": lease_id, "revoked": expires_at is not None, "expires_at": expires_at})
        elif expires_at is None:
            console.print(f"{lease_id} was already gone")
        else:
            console.print(f"revoked {lease_id}: its holder is told to stop; the slice goes on when it releases "
                          "or its lease lapses")


@lease_app.command("list")
def list_leases(as_json: JsonOpt = False) -> None:
    """List live leases."""
    with cli_errors():
        allocator = _allocator()
        leases = allocator.status()["leases"]
        if as_json:
            print_json([lease_row_numbers(row) for row in leases])
            return
        now_ms = allocator.now_ms()
        table = Table(title=f"{len(leases)} live lease(s)")
        for col in ("lease", "fence", "slice", "tenant", "holder", "priority", "expires in"):
            table.add_column(col)
        for row in leases:  # the whole lease id: `lease release` takes it
            left_s = max(0.0, (int(row["expires_at"]) - now_ms) / 1000)
            table.add_row(row["lease_id"], row["fence"], row["slice"], row["tenant"], row["holder"], row["priority"], f"{left_s:.0f} s")
        console.print(table)


def status(
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live view, redrawn in place until Ctrl-C (not with --json).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws with --watch.", min=0.1)] = 2.0,
    refreshes: Annotated[int | None, typer.Option(hidden=True, help="Stop after this many redraws (tests).")] = None,
) -> None:
    """Slices and their state, live leases, the wait queue, and each node agent's heartbeat age."""
    with cli_errors():
        settings = load_settings()
        if settings.redis_url is None and running_embedded_url(settings.state_dir) is None:
            print_error(  # a look must not start what `down` stopped
                f"the local cluster is not running: no embedded redis-server answers for state dir "
                f"{settings.state_dir} (`prefect-mig down` stopped it, or nothing started it yet). "
                "`prefect-mig up` starts it, as does a flow's first MIG task; `status` starts nothing."
            )
            raise typer.Exit(1)
        allocator = _allocator()
        if watch and not as_json:
            from prefect_mig.cli.live import watch as live_watch

            live_watch(lambda: allocator.status() | {"agents": health.agents(allocator), "now_ms": allocator.now_ms()},
                       interval_s=interval,
                       refreshes=refreshes, console=console)
            return
        snap = allocator.status() | {"agents": health.agents(allocator)}
        if as_json:
            print_json(snap | {"leases": [lease_row_numbers(row) for row in snap["leases"]]})
            return
        table = Table(title="slices")
        for col in ("node", "gpu", "slice", "state", "lease"):
            table.add_column(col)
        for s in snap["slices"]:
            table.add_row(s["node"], str(s["gpu_index"]), f"{s['profile']}@{s['start']}", s["state"], (s["lease"] or "")[:12])
        console.print(table)
        now = allocator.now_ms()
        for node, a in snap["agents"].items():
            age = "never" if a["age_s"] is None else f"{a['age_s']:.0f} s ago"
            flag = (" [red]STALE: its slices get no new grants (is `prefect-mig agent` running there? a node renamed "
                    f"or gone for good: {forget_advice(node, snap, now)})[/red]" if a["stale"] else "")
            by = f" (by pid {a['agent']['pid']} on {a['agent']['host']})" if a.get("agent") else ""
            console.print(f"agent {node}: last heartbeat {age}{by}{flag}", highlight=False)
        for node, n in snap["nodes"].items():
            if n.get("drained"):
                console.print(f"node {node}: DRAINED for maintenance, no new grants "
                              f"(`prefect-mig node resume {node}` puts it back)", highlight=False)
        if not snap["agents"]:
            console.print("[red]no node agent has published any GPU[/red] (start `prefect-mig up` or `prefect-mig agent`)")
        for name, m in snap["models"].items():
            console.print(
                f"GPU model {name} ({m['device_name']}): not in the catalog, built from NVML by its node agent; "
                f"profiles {', '.join(m['profiles'])}",
                highlight=False,
            )
        console.print(f"{len(snap['leases'])} live lease(s), {len(snap['queue'])} waiting request(s)")
        for r in snap["queue"]:
            console.print(f"  waiting {r['id'][:12]} priority {r['priority']} tenant {r['tenant']} for {', '.join(r['pkeys'])}", highlight=False)


def _prefect_events():
    """Emit layout events to Prefect when a Prefect API is configured (else None: no Prefect at all)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    from prefect_mig.integrations.prefect.events import emit_cluster_event

    return emit_cluster_event


def agent(
    node: Annotated[str | None, typer.Option(help="Node name (default PREFECT_MIG_NODE).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between heartbeats.", min=0.1)] = 5.0,
    heartbeat_ttl: Annotated[
        float, typer.Option(help="Without a heartbeat for this many seconds, the node gets no new grants.", min=1)
    ] = 30.0,
    once: Annotated[bool, typer.Option(help="Publish (and apply a desired layout) once and exit.")] = False,
    layout: Annotated[
        str | None,
        typer.Option(help="Carve GPUs that have MIG on and no instances to this layout config (default "
                     "PREFECT_MIG_LAYOUT or the layouts file's default; 'none': carve nothing)."),
    ] = None,
) -> None:
    """Publish this node's MIG slices to Redis and keep them in service."""
    import logging
    import signal

    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import backend_from_settings, fleet_node, resolve_backend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with cli_errors():
        settings = load_settings()
        if node is None and resolve_backend(settings) == "simulated":
            node, note = fleet_node(settings)
            if note:
                logging.getLogger("prefect_mig.agent").warning("%s", note)
        node = node or settings.node
        backend = backend_from_settings(settings, node=node)
        require_host_pid_namespace(backend)  # NVML hides other PID namespaces' processes
        with backend:
            docker_client = None
            try:
                from prefect_mig.launchers import ContainerSettings, DockerLauncher
                from prefect_mig.launchers.engines import docker_tls_from

                docker_client = DockerLauncher(
                    ContainerSettings(docker_host=settings.docker_host, docker_tls=docker_tls_from(settings))
                ).client
            except PrefectMigError as exc:
                errors.print(f"no Docker engine for fencing task containers: {exc}", markup=False)
            worker = NodeAgent(
                backend, _allocator(), node=node, docker_url=settings.docker_host, docker_client=docker_client,
                on_event=_prefect_events(),
                heartbeat_ttl_s=heartbeat_ttl, state_dir=settings.state_dir,
                gpu_locks=hold_gpus(backend, settings, "prefect-mig agent", node=node),
            )
            chosen = layout or settings.layout
            configs = settings.layout_configs() if chosen != "none" else None
            name = None if configs is None else chosen or configs.default
            if configs is not None and name not in configs.names():  # bad input: said before any wait for Redis
                option = "--layout" if layout else "PREFECT_MIG_LAYOUT"
                raise ConfigError(f"{option}={name!r}: no layout config of that name in {configs.source}; allowed: "
                                  f"{', '.join(configs.names())}, or 'none' to carve nothing.", field="layout", value=name)
            # `prefect-mig down` and the supervisor send SIGTERM: a carve under way finishes first;
            # installed before the claim, so one sent while the agent waits for Redis ends it
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, worker.terminate)
            # one process per GPU of this host, one agent per node: refused while another serves them;
            # started before redis-server (systemd), it waits for Redis (`--once` exits saying so)
            with worker.serving(wait_for_redis=not once, interval_s=interval):
                # serving, a claim that lapses mid-carve (Redis gone for a TTL) is claimed again, not an exit
                carved, published = worker.start(configs, name, retry=not once, interval_s=interval)
                for line in carved:
                    console.print(f"agent {node}: carved {line}", highlight=False)
                console.print(f"agent {node}: published {published[0]} slice(s)")
                if once:
                    worker.tick()  # and apply a desired layout, if one waits
                else:
                    worker.run(interval_s=interval, stop=threading.Event())  # until a signal ends it


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded redis-server (and the background agents that use it: see `prefect-mig down`)."""
    from prefect_mig.local_cluster import LocalCluster

    settings = load_settings()
    if LocalCluster(settings).stop():
        console.print("stopped the background agent(s) and repartitioner")
    stopped = stop_embedded_redis(settings.state_dir)
    console.print("stopped the embedded redis-server" if stopped else "no embedded redis-server was running")


api_app = typer.Typer(help="The HTTP lease API.", no_args_is_help=True)


@api_app.command("serve")
def api_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    certfile: Annotated[str | None, typer.Option(help="PEM certificate: serve HTTPS (with --keyfile).")] = None,
    keyfile: Annotated[str | None, typer.Option(help="PEM private key of --certfile.")] = None,
) -> None:
    """Serve the HTTP lease API (admin token PREFECT_MIG_API_TOKEN; clients: `api token create`)."""
    import uvicorn

    from prefect_mig.api import create_app

    with cli_errors():
        settings = load_settings()
        if settings.api_token is None:
            raise ConfigError(
                "PREFECT_MIG_API_TOKEN is not set: the API refuses to run without a bearer token "
                "(at least 16 characters).",
                field="api_token",
            )
        if (certfile is None) != (keyfile is None):
            raise ConfigError("--certfile and --keyfile go together (HTTPS needs both).", field="certfile")
        if not 0 < port < 65536:
            raise ConfigError(f"--port={port}: must be 1 to 65535.", field="port", value=port)
        for option, path in (("certfile", certfile), ("keyfile", keyfile)):
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(f"--{option}={path!r}: cannot be read; name an existing PEM file you can read.",
                                  field=option, value=path)
        _check_listen(host, port)
        app = create_app(
            _allocator(),
            token=settings.api_token.get_secret_value(),
            max_wait_s=settings.api_max_wait_s,
            max_body_bytes=settings.api_max_body_bytes,
            docs=settings.api_docs,
        )
    uvicorn.run(app, host=host, port=port, log_level="info", ssl_certfile=certfile, ssl_keyfile=keyfile)


def _check_listen(host: str, port: int) -> None:
    """Refuse a --host/--port the API could not listen on (an address not of this machine, a port in
    use) naming them, before uvicorn says only "[Errno 98] ..."; the probe socket is closed at once."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a listener refuses it
            probe.bind(address)
    except OSError as exc:
        raise cannot_listen(host, port, exc) from exc


def cannot_listen(host: str, port: int, exc: OSError) -> ConfigError:
    """The error of a server (`api serve`, `metrics serve`) that cannot listen on host:port."""
    return ConfigError(
        f"--host={host!r}, --port={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); give an address "
        "of this machine (127.0.0.1, or 0.0.0.0 for every interface) and a port nothing else listens on.",
        field="host", value=f"{host}:{port}",
    )


token_app = typer.Typer(help="Per-client tokens of the HTTP lease API.", no_args_is_help=True)
api_app.add_typer(token_app, name="token")


def _tokens():
    from prefect_mig.allocator.tokens import TokenStore

    return TokenStore(_allocator().redis, load_settings().namespace)


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="The tenant this token leases as (quotas are charged to it).")],
    max_priority: Annotated[int, typer.Option(help="Highest priority it may ask for (0-100).")] = 50,
    admin: Annotated[bool, typer.Option("--admin", help="May see and revoke every lease, any tenant.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a token; its secret is printed once (Redis keeps only its hash)."""
    from prefect_mig.allocator.tokens import TokenGrant

    with cli_errors():
        try:
            TokenGrant(token_id="new", tenant=tenant, max_priority=max_priority)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(
                f"--{str(first['loc'][0]).replace('_', '-')}={first.get('input')!r}: {first['msg']}",
                field=str(first["loc"][0]),
                value=first.get("input"),
            ) from exc
        secret, grant = _tokens().create(tenant=tenant, max_priority=max_priority, admin=admin)
    if as_json:
        print_json({"token": secret, **grant.model_dump()})
    else:
        console.print(f"token {grant.token_id} for tenant {tenant} (max priority {max_priority}"
                      f"{', admin' if admin else ''}); shown once:")
        console.print(secret, soft_wrap=True, highlight=False)


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """The tokens (id, tenant, ceiling, admin), never their secrets."""
    with cli_errors():
        grants = _tokens().list()
    if as_json:
        print_json([g.model_dump() for g in grants])
        return
    table = Table("id", "tenant", "max priority", "admin")
    for g in grants:
        table.add_row(g.token_id, g.tenant, str(g.max_priority), "yes" if g.admin else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="The id `api token list` shows.")]) -> None:
    """Revoke a token: requests with it are refused from now on."""
    with cli_errors():
        if not _tokens().revoke(token_id):
            raise ConfigError(f"token id {token_id!r}: no such token (see `prefect-mig api token list`).", field="token_id", value=token_id)
    console.print(f"revoked token {token_id}")


repartition_app = typer.Typer(help="Make MIG layouts follow the demand.", no_args_is_help=True)
DrainCostOpt = Annotated[
    float, typer.Option(help="Served requests a drain must gain per lease in its way expected to run 600 s more.")
]
ProfilesOpt = Annotated[str, typer.Option(help="Profiles layouts use: classic, extended (classic plus each model's 2-memory-slice 1g, e.g. 1g.20gb on an H100), all.")]
IdleWindowOpt = Annotated[
    float, typer.Option(help="While nothing waits, re-carve only slices idle this many seconds.")
]
ValueByOpt = Annotated[str, typer.Option(help="What a served request is worth to the planner: request (one each) or dominant (its slice's dominant share of the GPU).")]


def _knobs(drain_cost: float, profiles: str, idle_window: float, value_by: str = Knobs.value_by):
    for flag, value in (("--drain-cost", drain_cost), ("--idle-window", idle_window)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag}={value!r}: must be a finite number, 0 or more.", field=flag, value=value)
    chosen = profile_set(profiles, field="--profiles")
    return Knobs(drain_cost=drain_cost, profiles=chosen, idle_window_s=idle_window,
                 value_by=value_by_choice(value_by, field="--value-by"))



@repartition_app.command("plan")
def repartition_plan(
    drain_cost: DrainCostOpt = Knobs.drain_cost,
    profiles: ProfilesOpt = "extended",
    idle_window: IdleWindowOpt = Knobs.idle_window_s,
    value_by: ValueByOpt = Knobs.value_by,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: what the planner would change on each GPU, given the queue and recent grants."""
    from prefect_mig.repartition.service import plan_from_allocator

    with cli_errors():
        plans = plan_from_allocator(_allocator(), knobs=_knobs(drain_cost, profiles, idle_window, value_by))
        if as_json:
            print_json(
                [
                    {
                        "gpu_uuid": p.gpu_uuid, "node": p.node, "kind": p.kind, "current": str(p.current),
                        "target": str(p.target), "destroy": [str(x) for x in p.destroy],
                        "create": [str(x) for x in p.create], "served": p.served,
                    }
                    for p in plans
                ]
            )
            return
        table = Table(title="repartition plan (dry run)")
        for col in ("node", "gpu", "kind", "current", "target"):
            table.add_column(col)
        for p in plans:
            table.add_row(p.node, p.gpu_uuid[:12], p.kind, str(p.current), str(p.target))
        console.print(table)


@repartition_app.command("apply")
def repartition_apply(
    drain_cost: DrainCostOpt = Knobs.drain_cost,
    profiles: ProfilesOpt = "extended",
    idle_window: IdleWindowOpt = Knobs.idle_window_s,
    value_by: ValueByOpt = Knobs.value_by,
    as_json: JsonOpt = False,
) -> None:
    """Plan once and write the changes as desired layouts; the node agents apply them."""
    from prefect_mig.repartition.service import run_once

    with cli_errors():
        changes = run_once(_allocator(), knobs=_knobs(drain_cost, profiles, idle_window, value_by))
        rows = [{"gpu_uuid": p.gpu_uuid, "node": p.node, "kind": p.kind, "target": str(p.target)} for p in changes]
        if as_json:
            print_json(rows)
        else:
            console.print(f"{len(rows)} change(s) desired" + "".join(f"\n  {r['node']} {r['gpu_uuid'][:12]} {r['kind']}: {r['target']}" for r in rows))


@repartition_app.command("serve")
def repartition_serve(
    interval: Annotated[float, typer.Option(help="Seconds between planning rounds at the latest.", min=0.1)] = 30.0,
    debounce: Annotated[
        float, typer.Option(help="After a lease ends or a request queues, gather more events this long, then plan.", min=0)
    ] = 1.0,
    drain_cost: DrainCostOpt = Knobs.drain_cost,
    profiles: ProfilesOpt = "extended",
    idle_window: IdleWindowOpt = Knobs.idle_window_s,
    value_by: ValueByOpt = Knobs.value_by,
) -> None:
    """Plan when a lease ends, a request queues or a flow run ends (a Prefect API configured), at the
    latest every --interval seconds, and desire the changes (the agents apply them). With a Prefect
    API it also emits ``prefect-mig.lease.expired`` and ``prefect-mig.agent.stale`` for what it sweeps."""
    import threading

    from prefect_mig.repartition.service import serve
    from prefect_mig.repartition.trigger import Trigger

    with cli_errors():
        allocator = _allocator()
        knobs = _knobs(drain_cost, profiles, idle_window, value_by)
        trigger = Trigger(allocator, debounce_s=debounce)
        stop = threading.Event()
        emit = _prefect_events()
        if emit is not None:
            from prefect_mig.integrations.prefect.events import watch_flow_run_ends

            watch_flow_run_ends(trigger.poke, stop)
        console.print(f"repartitioning on lease and queue events{' and flow-run ends' if emit else ''}, "
                      f"at the latest every {interval:g} s (Ctrl-C stops)")
        try:
            serve(
                allocator, knobs=knobs, interval_s=interval, stop=stop, trigger=trigger, on_event=emit,
                on_plan=lambda p: console.print(f"desired {p.kind} on {p.node} {p.gpu_uuid[:12]}: {p.target}"),
            )
        except KeyboardInterrupt:
            stop.set()
            errors.print("repartitioning stopped")
