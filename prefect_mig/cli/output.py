"""How commands print: rich tables for people, one JSON document for scripts, errors on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from prefect_mig.errors import ConfigError, PrefectMigError

#: piped output (a file, grep, a log) is not cut at 80 columns: tables keep whole ids and times
PIPED_WIDTH = 240


def _console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = getattr(stream, "isatty", lambda: False)()
    return Console(stderr=stderr, width=None if tty or "COLUMNS" in os.environ else PIPED_WIDTH)


console = _console()
errors = _console(stderr=True)


def print_json(data: Any) -> None:
    """Write `data` as JSON to stdout, with nothing else around it."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Exit 2 on bad input (`ConfigError`: unknown model, profile, ...), 1 on other failures."""
    try:
        yield
    except ConfigError as exc:
        print_error(exc)
        raise typer.Exit(2) from exc
    except PrefectMigError as exc:
        print_error(exc)
        raise typer.Exit(1) from exc


def print_error(message: object) -> None:
    """``error: <message>`` on stderr, the message as plain text: it quotes settings' formats and
    users' values (``redis+sentinel://host[,host...]/service[/db]``, a tenant ``team[/x]``), which
    rich would otherwise read as markup (and fail on, or drop)."""
    errors.print(Text.assemble(("error:", "red"), " ", str(message)), highlight=False)
