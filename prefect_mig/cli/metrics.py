"""``prefect-mig metrics serve``: the cluster's Prometheus metrics over HTTP (see `prefect_mig.metrics`)."""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from prefect_mig.cli.output import cli_errors, console
from prefect_mig.errors import ConfigError

metrics_app = typer.Typer(help="Prometheus metrics of the whole cluster, computed from Redis.", no_args_is_help=True)


@metrics_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (the metrics name tenants: keep it private).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; Prometheus scrapes http://HOST:PORT/metrics.")] = 9808,
) -> None:
    """Serve /metrics for Prometheus until interrupted (no token: bind it to a private interface)."""
    from prometheus_client import start_http_server

    from prefect_mig.cli.leases import _allocator, _check_listen, cannot_listen
    from prefect_mig.metrics import registry_for

    with cli_errors():
        if not 0 < port < 65536:
            raise ConfigError(f"--port={port}: must be 1 to 65535.", field="port", value=port)
        _check_listen(host, port)
        registry = registry_for(_allocator())
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as exc:  # taken between the check and here
            raise cannot_listen(host, port, exc) from exc
    console.print(f"serving the cluster's metrics on http://{host}:{port}/metrics", highlight=False)
    threading.Event().wait()
