"""``prefect-mig report``: usage and cost per tenant, GPU or profile (see `prefect_mig.usage`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefect_mig.cli.output import cli_errors, console, print_json
from prefect_mig.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or ``2w`` in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--since={text!r}: give a positive number and a unit (s, m, h, d, w), e.g. 7d.",
                          field="since", value=text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def report(
    since: Annotated[str, typer.Option(help="How far back: 90m, 12h, 7d, 2w.")] = "7d",
    by: Annotated[str, typer.Option(help="Rows per tenant, gpu or profile.")] = "tenant",
    price_per_gpu_hour: Annotated[float, typer.Option(help="Price of one whole GPU for one hour; a slice costs its "
                                                      "share of the GPU's compute slices (a finite number, 0 or more).")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    png: Annotated[Path | None, typer.Option(help="Also draw slice-hours per hour, leased by tenant and idle, "
                                             "into this PNG file.")] = None,
) -> None:
    """Slice-hours (leased and idle), compute-slice-hours, GPU-hours, waits, preemptions, admin
    revocations and cost, from hourly rollups."""
    from prefect_mig.cli.leases import _allocator
    from prefect_mig.usage import hourly
    from prefect_mig.usage import report as usage_report

    with cli_errors():
        seconds = parse_since(since)
        allocator = _allocator()
        got = usage_report(allocator, since_s=seconds, by=by, price_per_gpu_hour=price_per_gpu_hour)  # type: ignore[arg-type]
        if png is not None:
            draw_png(hourly(allocator, since_s=seconds), png, title=f"slice-hours per hour, last {since}")
    if as_json:
        print_json(got)
        return
    table = Table(title=f"usage by {by}, last {since} (slice time in the hours it was held; lease counts and "
                        "waits in the hour the lease ended)")
    cols = ("key", "slice_hours", "idle_slice_hours", "compute_slice_hours", "gpu_hours", "leases", "mean_wait_s",
            "p95_wait_s_at_most", "preemptions", "admin_revocations", "cost")
    for col in cols:
        table.add_column(col.replace("_", " "))
    for row in got["rows"]:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in cols))
    console.print(table)
    t = got["totals"]
    console.print(f"cluster: {t['carved_slice_hours']:g} slice-hours carved, {t['leased_slice_hours']:g} leased, "
                  f"{t['idle_slice_hours']:g} idle", highlight=False)
    if png is not None:
        console.print(f"chart written to {png}", highlight=False)


def draw_png(hours: list[dict], path: Path, *, title: str) -> None:
    """Stacked bars per hour: each tenant's leased slice-hours, then the idle ones (`usage.hourly`)."""
    from datetime import datetime, timezone

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = sorted({t for h in hours for t in h["leased"]})
    x = [datetime.fromtimestamp(h["hour_ms"] / 1000, tz=timezone.utc) for h in hours]
    fig, ax = plt.subplots(figsize=(11, 4))
    bottom = [0.0] * len(hours)
    for name in tenants:
        values = [h["leased"].get(name, 0.0) for h in hours]
        ax.bar(x, values, width=1 / 24 * 0.9, bottom=bottom, align="edge", label=f"leased: {name}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar(x, [h["idle"] for h in hours], width=1 / 24 * 0.9, bottom=bottom, align="edge", color="lightgrey",
           label="idle (carved, not leased)")
    ax.set_ylabel("slice-hours")
    ax.set_xlabel("hour (UTC)")
    ax.set_title(title)
    if hours:
        ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
