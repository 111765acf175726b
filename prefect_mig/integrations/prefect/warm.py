"""Warm slices for `MigTaskRunner(keep_warm_s=...)`: which tries may share a task process.

A try may run in the warm process another try of the same runner left on its slice when both have
the same key: the sharing scope (the flow run by default; the deployment or the tenant with
``share_warm``), the slice request (profile, priority, tenant, TTL, preemptible) and the runner's
configuration (image, env, volumes, network, limits, cluster), and the cluster and Docker engine it
runs on (`cluster_identity`: a process that moves to another namespace or Redis between flow runs
never hands the first cluster's slot to the second's tasks). Retries (``run_count > 1``) always
get a fresh container, and so does any try after one that raised, crashed, timed out or was
cancelled (`prefect_mig.launchers.warm_pool` never keeps those). The slots themselves, and how
warmth gives way to anyone else who waits, are in `prefect_mig.launchers.warm_pool` and
`prefect_mig.allocator.warmth`.

Examples:
    ```python
    from prefect_mig.integrations.prefect.warm import check_warm

    assert check_warm(30, None) == (30.0, None)
    assert check_warm(0, "tenant") == (0.0, "tenant")
    ```
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect_mig.errors import ConfigError
from prefect_mig.integrations.prefect.flow_run_end import on_flow_run_end
from prefect_mig.launchers import DockerLauncher
from prefect_mig.launchers.warm import WarmContainer
from prefect_mig.launchers.warm_pool import POOL, LocalWaiter, WarmSlot

#: the longest a runner may keep an idle process warm
MAX_KEEP_WARM_S = 3600.0
SHARE_WARM = ("deployment", "tenant")


def check_warm(keep_warm_s: Any, share_warm: Any) -> tuple[float, str | None]:
    """Refuse a bad ``keep_warm_s`` / ``share_warm`` now, naming it."""
    try:
        value = float(keep_warm_s)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(keep_warm_s, bool) or not (math.isfinite(value) and 0 <= value <= MAX_KEEP_WARM_S):
        raise ConfigError(
            f"MigTaskRunner keep_warm_s={keep_warm_s!r}: give seconds from 0 (no warm slices) to {MAX_KEEP_WARM_S:g}.",
            field="keep_warm_s",
            value=keep_warm_s,
        )
    if share_warm is not None and share_warm not in SHARE_WARM:
        raise ConfigError(
            f"MigTaskRunner share_warm={share_warm!r}: allowed are None (one flow run), "
            + " or ".join(repr(x) for x in SHARE_WARM) + ".",
            field="share_warm",
            value=share_warm,
        )
    return value, share_warm


def warm_key(runner, request, ctx, flow_ctx) -> Hashable | None:
    """The key of the warm slots a try may use; None for a retry or outside a flow run."""
    if ctx is None or ctx.task_run.run_count > 1:
        return None
    flow_run = getattr(flow_ctx, "flow_run", None)
    run_id = str(ctx.task_run.flow_run_id)
    if runner.share_warm == "tenant":
        scope: tuple = ("tenant", request.tenant)
    elif runner.share_warm == "deployment" and getattr(flow_run, "deployment_id", None):
        scope = ("deployment", str(flow_run.deployment_id))
    else:
        scope = ("flow-run", run_id)
    config = {k: v for k, v in runner._config().items() if k not in ("max_workers", "keep_warm_s")}
    return (scope, request.model_copy(update={"holder": ""}), repr(sorted(config.items(), key=lambda kv: kv[0])),
            cluster_identity(runner))


def cluster_identity(runner) -> str:
    """A digest of where `runner`'s tries lease and run: its ``cluster`` block's Redis URL and
    namespace, or, without one, the ``PREFECT_MIG_*`` and ``DOCKER_*`` environment and ``.env``
    lines its settings come from (read as is: a warm hit must stay cheap). A block's URL is a
    secret, so only a digest."""
    if runner.cluster is not None:
        where = [runner.cluster.redis_url.get_secret_value(), runner.cluster.namespace]
    else:
        where = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("PREFECT_MIG_", "DOCKER_")))
        where += dotenv_settings()
    return hashlib.sha256("\0".join(where).encode()).hexdigest()[:16]


_DOTENV_READ: list = [None]  # the .env last read: (its path and stat, its PREFECT_MIG_* lines)


def dotenv_settings() -> list[str]:
    """The ``PREFECT_MIG_*`` lines of the ``.env`` file the settings also read (in the working
    directory, as pydantic-settings reads it; any case), read again only when its stat changes."""
    from prefect_mig.settings import Settings

    path = os.path.abspath(str(Settings.model_config.get("env_file") or ".env"))
    try:
        st = os.stat(path)
        stamp: tuple = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return []
    read = _DOTENV_READ[0]
    if read is None or read[0] != stamp:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f]
        except OSError:
            return []
        read = (stamp, [f".env:{line}" for line in lines
                        if line.removeprefix("export ").lstrip().upper().startswith("PREFECT_MIG_")])
        _DOTENV_READ[0] = read
    return list(read[1])


def end_with_flow_run(flow_ctx, scope: tuple) -> None:
    """Stop the warm slots of `scope` (a flow run's) when that flow run ends, in any final state
    (`prefect_mig.integrations.prefect.flow_run_end`; without that hook they lapse after
    ``keep_warm_s``)."""
    if flow_ctx is not None and on_flow_run_end(flow_ctx, ("warm", scope), lambda: POOL.end_scope(scope)):
        POOL.open_scope(scope)  # a retried flow run keeps its id: this attempt's slots may stay warm


@contextmanager
def local_waiter(key: Hashable | None, request_id: str) -> Iterator[LocalWaiter]:
    """While a queued try waits, a finishing slot of its key may be passed to it (key None: never)."""
    if key is None:
        yield LocalWaiter(key=None, request_id=request_id, stop=None)  # type: ignore[arg-type]
        return
    with POOL.waiting(key, request_id) as waiter:
        yield waiter


def passed_slot(waiter: LocalWaiter) -> WarmSlot | None:
    """The slot passed to the wait, now the caller's (the waiter no longer holds it)."""
    return POOL.claim_passed(waiter) if waiter.key is not None else None


def take_into(key, taken: list[WarmSlot], *, keep_warm_s: float) -> WarmSlot | None:
    """`POOL.take`, also putting the slot into `taken` before returning, so that a timeout raised
    into the caller as this returns still finds it (and the caller's finally gives it back)."""
    slot = POOL.take(key, keep_warm_s=keep_warm_s)
    if slot is not None:
        taken.append(slot)
    return slot


def adopt_into(key, lease, launcher: DockerLauncher, labels: dict[str, str], taken: list[WarmSlot], *,
               keep_warm_s: float) -> WarmSlot:
    """Start a warm container on `lease`'s slice (renewing the lease between its create and its
    start: see `start_confirmed`) and adopt it as a slot, also putting the slot
    into `taken` before returning. Run it `shielded`: a timeout raised into the caller while the
    container starts waits for the slot, and the caller's finally finds it in `taken` and stops
    the container with its lease (as `take_into` does for a slot taken from the pool)."""
    container = WarmContainer.start(launcher, mig_uuid=lease.slice.mig_uuid, labels=labels, confirm=lease.confirm)
    slot = POOL.adopt(key, lease, container, keep_warm_s=keep_warm_s)
    taken.append(slot)
    return slot
