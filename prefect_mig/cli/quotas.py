"""``prefect-mig quota set|clear|list``: limit how many slices and compute slices a tenant's live
leases hold at once (a request over its tenant's quota waits, and preempts nobody for it)."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from prefect_mig.allocator.models import Quota
from prefect_mig.cli.leases import JsonOpt, _allocator
from prefect_mig.cli.output import cli_errors, console, errors, print_json
from prefect_mig.errors import ConfigError

quota_app = typer.Typer(help="Tenants' quotas: at most N slices, or N compute slices, held at once.",
                        no_args_is_help=True)

TenantArg = Annotated[str, typer.Argument(help="The tenant, as requests name it (SliceRequest.tenant, a client token's tenant).")]
_TENANT = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")  # SliceRequest.tenant's pattern


def _tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise ConfigError(f"tenant: {tenant!r} is not a tenant name; use 1 to 64 letters, digits and _ . : @ -.",
                          field="tenant", value=tenant)
    return tenant


def _limits(row: dict) -> str:
    parts = [f"{row['slices']} slice(s)" if row["slices"] is not None else None,
             f"{row['compute']} compute slice(s)" if row["compute"] is not None else None]
    return " and ".join(p for p in parts if p)


@quota_app.command("set")
def set_quota(
    tenant: TenantArg,
    slices: Annotated[Optional[int], typer.Option("--slices", help="At most this many slices at once.")] = None,
    compute: Annotated[Optional[int], typer.Option("--compute", help="At most this many compute slices at once (a 3g is 3).")] = None,
) -> None:
    """Set TENANT's quota (replacing any it had); leases it holds already run on."""
    with cli_errors():
        _tenant(tenant)
        if slices is None and compute is None:
            raise ConfigError("--slices and --compute: give at least one of them (to lift a quota: `prefect-mig quota clear`).",
                              field="slices")
        for flag, value, most in (("--slices", slices, 100_000), ("--compute", compute, 1_000_000)):  # Quota's bounds
            if value is not None and not 0 <= value <= most:
                raise ConfigError(f"{flag}={value!r}: must be a whole number, 0 or more and at most {most:,}.",
                                  field=flag, value=value)
        quota = Quota(slices=slices, compute=compute)
        allocator = _allocator()
        allocator.set_quota(tenant, quota)
        console.print(f"tenant {tenant}: at most {_limits(quota.model_dump())} held at once", highlight=False)


@quota_app.command("clear")
def clear_quota(tenant: TenantArg) -> None:
    """Lift TENANT's quota. Exit 1 if it had none."""
    with cli_errors():
        allocator = _allocator()
        if not any(row["tenant"] == _tenant(tenant) for row in allocator.quotas()):
            errors.print(f"tenant {tenant} has no quota; `prefect-mig quota list` shows those that do", highlight=False)
            raise typer.Exit(1)
        allocator.set_quota(tenant, None)
        console.print(f"tenant {tenant}: no quota", highlight=False)


@quota_app.command("list")
def list_quotas(as_json: JsonOpt = False) -> None:
    """Tenants with a quota: their limits and what their live leases hold now."""
    with cli_errors():
        rows = _allocator().quotas()
        if as_json:
            print_json(rows)
            return
        if not rows:
            console.print("no tenant has a quota", highlight=False)
        for row in rows:
            console.print(f"{row['tenant']}: at most {_limits(row)}; holds {row['slices_held']} slice(s), "
                          f"{row['compute_held']} compute slice(s)", highlight=False)
