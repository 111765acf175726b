"""``prefect-mig node drain|resume|forget``: take a GPU host out of service for maintenance and
back, or forget one that is gone for good.

``drain`` stops new grants on the node at once; leases already held run on. With ``--wait`` it
waits (up to ``--timeout``) for them to end and exits 0 when the node is idle, or 1 naming who
still holds slices there. ``status`` shows drained nodes until ``resume``. ``forget`` removes the
records of a node renamed or taken out of the fleet (``status`` shows it STALE until then), only
while no agent claims it and no lease is held there; else it exits 1 saying what holds it. A slice
there awaiting the fencing of an expired holder's task container holds it too, unless
``--host-is-gone``: then a tombstone stays, and the node's slices, should it publish again, are
granted only after its agent's fencing pass.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from prefect_mig.allocator.maintenance import drain_node
from prefect_mig.cli.leases import JsonOpt, _allocator
from prefect_mig.cli.output import cli_errors, console, errors, print_json
from prefect_mig.errors import ConfigError

node_app = typer.Typer(help="Drain a GPU host for maintenance and resume it, or forget one gone for good.",
                       no_args_is_help=True)

NodeArg = Annotated[str, typer.Argument(help="The node's name, as its agent publishes it (PREFECT_MIG_NODE).")]


def _lease_line(row: dict, now_ms: int) -> str:
    left_s = max(0, int(row["expires_at"] or 0) - now_ms) / 1000
    return (f"  lease {row['lease_id'][:12]} on {row['slice']} held by {row['holder']} "
            f"(tenant {row['tenant']}, priority {row['priority']}), expires in {left_s:.0f} s")


@node_app.command("drain")
def drain(
    node: NodeArg,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the leases held on the node to end.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop new grants on NODE; held leases run on. Exit 1 if --wait ran out with leases still held."""
    with cli_errors():
        if not timeout >= 0:
            raise ConfigError(f"--timeout={timeout!r}: must be 0 or more seconds.", field="timeout", value=timeout)
        allocator = _allocator()
        started = time.monotonic()
        left = drain_node(allocator, node, wait_s=timeout if wait else 0.0)
        if as_json:
            print_json({"node": node, "drained": True, "leases": left})
        elif not left:
            console.print(f"node {node} drained: no new grants, and no lease is held there; it may go down "
                          f"(`prefect-mig node resume {node}` puts it back)", highlight=False)
        else:
            waited = f" after waiting {time.monotonic() - started:.0f} s" if wait else ""
            console.print(f"node {node} drained: no new grants. {len(left)} lease(s) still held{waited}:", highlight=False)
            now = allocator.now_ms()
            for row in left:
                console.print(_lease_line(row, now), highlight=False)
        if wait and left:
            errors.print(f"node {node}: {len(left)} lease(s) did not end within {timeout:g} s; wait longer, "
                         "or ask their holders to stop", highlight=False)
            raise typer.Exit(1)


@node_app.command("resume")
def resume(node: NodeArg) -> None:
    """Put a drained NODE back into service: its idle slices are granted again."""
    with cli_errors():
        _allocator().drain_node(node, drain=False)
        console.print(f"node {node} resumed: its slices are granted again", highlight=False)


@node_app.command("forget")
def forget(
    node: NodeArg,
    host_is_gone: Annotated[bool, typer.Option(
        "--host-is-gone",
        help="The host is gone for good: also drop its slices that await the fencing of an expired holder's "
             "task container (nobody is left to fence them). Should the node ever publish again, each of its "
             "slices stays quarantined until its agent removed any old task container.")] = False,
) -> None:
    """Remove NODE's records (a node renamed, or taken out of the fleet: `status` shows it STALE).
    Refused, exit 1, while an agent claims it or a live lease is held there, or (without
    --host-is-gone) a slice there awaits the fencing of an expired holder's task container."""
    with cli_errors():
        slices, gpus = _allocator().forget_node(node, host_is_gone=host_is_gone)
        back = ("if it ever publishes again, its slices are granted only after its agent removed any old task "
                "container" if host_is_gone else "an agent that publishes it again brings it back")
        console.print(f"node {node} forgotten: {slices} slice(s) and {gpus} GPU(s) removed from the inventory; "
                      f"{back}", highlight=False)
