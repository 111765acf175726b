"""How commands print: rich tables for people, one JSON document for scripts, errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from prefect_mig.errors import ConfigError, PrefectMigError

console = Console()
errors = Console(stderr=True)


def print_json(data: Any) -> None:
    """Write `data` as JSON to stdout, with nothing else around it."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Exit 2 on bad input (`ConfigError`: unknown model, profile, ...), 1 on other failures."""
    try:
        yield
    except ConfigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from exc
    except PrefectMigError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
