"""``prefect-mig status --watch``: a live view of the cluster (rich Live, redrawn in place).

One bar per GPU, a cell per compute slice of each MIG slice, coloured by state, with who holds
each leased slice; the queue by kind and priority band; agents whose heartbeat lapsed.

Examples:
    ```python
    from rich.console import Console
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.cli.live import view
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
        alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-a", holder="job-1"))
        console = Console(width=120, record=True)
        console.print(view(alloc.status() | {"agents": {}}))
        assert "team-a/job-1" in console.export_text()
    ```
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from prefect_mig.metrics import priority_band

_STYLE = {"free": "green", "leased": "bold red", "draining": "yellow", "withdrawn": "magenta",
          "unavailable": "grey50", "quarantined": "cyan"}


def forget_advice(node: str, snap: dict[str, Any], now_ms: int) -> str:
    """The `node forget` command for a stale `node` of a status snapshot: with --host-is-gone when a
    plain forget would refuse, because a slice awaits the fencing of an expired holder's container
    (quarantined) or is held by a lease already past its expiry (forget reaps it first)."""
    expired = {row["lease_id"] for row in snap["leases"] if row.get("expires_at") and int(row["expires_at"]) < now_ms}
    if any(s["node"] == node and (s["state"] == "quarantined" or s["lease"] in expired) for s in snap["slices"]):
        return (f"`prefect-mig node forget {node} --host-is-gone` (its slices await the fencing of expired "
                "holders' task containers)")
    return f"`prefect-mig node forget {node}`"


def view(snap: dict[str, Any]) -> Group:
    """The live view of one `Allocator.status()` snapshot (plus ``agents``)."""
    holders = {row["lease_id"]: f"{row.get('tenant', 'default')}/{row.get('holder', '')}" for row in snap["leases"]}
    gpus: dict[tuple[str, int], list[dict]] = {}
    for s in snap["slices"]:
        gpus.setdefault((s["node"], s["gpu_index"]), []).append(s)
    table = Table(title=f"{len(gpus)} GPU(s), {len(snap['leases'])} live lease(s)", expand=False)
    for col in ("GPU", "slices (one cell per compute slice)", "held by"):
        table.add_column(col)
    for (node, index), slices in sorted(gpus.items()):
        bar, held = Text(), []
        for s in sorted(slices, key=lambda x: x["start"]):
            style = _STYLE.get(s["state"], "white")
            bar.append("[" + "#" * max(1, int(s.get("compute_slices", 1))) + "]", style=style)
            if s["lease"]:
                held.append(f"{s['profile']}@{s['start']}: {holders.get(s['lease'], s['lease'][:12])}")
        table.add_row(f"{node} GPU {index}", bar, "\n".join(held) or "-")
    parts: list[Any] = [table]
    depth = Counter((",".join(r["pkeys"]), priority_band(int(r["priority"]))) for r in snap["queue"])
    if depth:
        queue = Table(title=f"{len(snap['queue'])} waiting request(s)")
        for col in ("kind", "priority", "waiting"):
            queue.add_column(col)
        for (kind, band), n in sorted(depth.items()):
            queue.add_row(kind, band, str(n))
        parts.append(queue)
    else:
        parts.append(Text("no request waits"))
    for node, a in snap.get("agents", {}).items():
        if a["stale"]:
            age = "never heartbeated" if a["age_s"] is None else f"last heartbeat {a['age_s']:.0f} s ago"
            advice = forget_advice(node, snap, snap["now_ms"]) if "now_ms" in snap else f"`prefect-mig node forget {node}`"
            parts.append(Text(f"agent {node}: STALE, {age}: its slices get no new grants (a node renamed or gone "
                              f"for good: {advice})", style="red"))
    parts.append(Text("legend: ", style="dim") + Text(" ".join(f"{k}" for k in _STYLE)))
    return Group(*parts)


def watch(snapshot, *, interval_s: float, refreshes: int | None = None, console=None) -> None:  # noqa: ANN001
    """Redraw `view(snapshot())` in place every `interval_s` until interrupted (or `refreshes` times)."""
    from rich.live import Live

    done = 0
    if console is not None and not console.is_terminal:
        # a pipe or a file: Live draws nothing there until it stops, so print each view whole
        console.print(view(snapshot()))
        while refreshes is None or done < refreshes:
            time.sleep(interval_s)
            console.print(view(snapshot()))
            done += 1
        return
    with Live(view(snapshot()), console=console, refresh_per_second=4, transient=False) as live:
        while refreshes is None or done < refreshes:
            time.sleep(interval_s)
            live.update(view(snapshot()))
            done += 1
