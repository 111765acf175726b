"""``prefect-mig report``: usage and cost per tenant, GPU or profile (see `prefect_mig.usage`)."""

from __future__ import annotations

import re
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
                                                      "share of the GPU's compute slices.", min=0)] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Slice-hours, compute-slice-hours, GPU-hours, waits, preemptions and cost, from hourly rollups."""
    from prefect_mig.cli.leases import _allocator
    from prefect_mig.usage import report as usage_report

    with cli_errors():
        seconds = parse_since(since)
        got = usage_report(_allocator(), since_s=seconds, by=by, price_per_gpu_hour=price_per_gpu_hour)  # type: ignore[arg-type]
    if as_json:
        print_json(got)
        return
    table = Table(title=f"usage by {by}, last {since} (leases count in the hour they ended)")
    cols = ("key", "slice_hours", "compute_slice_hours", "gpu_hours", "leases", "mean_wait_s", "p95_wait_s_at_most",
            "preemptions", "cost")
    for col in cols:
        table.add_column(col.replace("_", " "))
    for row in got["rows"]:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in cols))
    console.print(table)
