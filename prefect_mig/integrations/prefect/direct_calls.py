"""Send *direct* calls of ``mig:``-tagged tasks to a slice when the flow's runner is a `MigTaskRunner`.

Prefect runs a direct call (``infer(batch)``, not ``.submit``) in the flow's own thread without
asking the flow's task runner, so a flow-level `MigTaskRunner` never sees it and the body would
silently run on the host. While a `MigTaskRunner` is in use, ``prefect.task_engine.run_task`` (what
``Task.__call__`` imports at each call) is wrapped once: under a flow whose task runner is a
`MigTaskRunner`, a task that asks for a slice (a ``mig:`` tag on the task or from a surrounding
``with tags(...)``) runs its body on a slice; every other call goes through unchanged. Its
``run_task_sync`` and ``run_task_async`` are wrapped too, only to warn when such a task runs under
a flow whose runner is no `MigTaskRunner` (a subflow: it does not inherit its parent's).

Examples:
    ```python
    from prefect import task

    from prefect_mig.integrations.prefect.direct_calls import wants_slice

    assert wants_slice(task(tags=["mig:1g.10gb"])(lambda: 1))
    assert not wants_slice(task(lambda: 1))
    assert not wants_slice(task(tags=["mig:1g.10gb", "mig:none"])(lambda: 1))
    ```
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from prefect_mig.integrations.prefect.profiles import NO_SLICE_TAG

PROFILE_TAG = "mig:"
_LOCK = threading.Lock()
_installed = False


def wants_slice(task) -> bool:
    """Whether `task` asks for a slice: a ``mig:`` tag of its own or from ``with tags(...)``, and
    no ``mig:none`` (`keeps_off_slices`)."""
    tags = _tags_of(task)
    return NO_SLICE_TAG not in tags and any(t.startswith(PROFILE_TAG) for t in tags)


def keeps_off_slices(task) -> bool:
    """Whether `task` is tagged ``mig:none`` (its own tag or from ``with tags(...)``): it runs in
    the flow's process even under a flow-level `MigTaskRunner` with a profile."""
    return NO_SLICE_TAG in _tags_of(task)


def _tags_of(task) -> set[str]:
    from prefect.context import TagsContext

    return set(task.tags) | set(TagsContext.get().current_tags)


def route_direct_calls() -> None:
    """Wrap ``prefect.task_engine.run_task`` once per process (idempotent), and its ``run_task_sync``
    and ``run_task_async`` (which it and Prefect's task runners call) to warn of a ``mig:``-tagged
    task that runs on no slice (`_warn_off_slice`)."""
    global _installed
    import prefect.task_engine as engine

    with _LOCK:
        if _installed:
            return
        engine.run_task = _routed(engine.run_task)
        engine.run_task_sync = _warning(engine.run_task_sync)
        engine.run_task_async = _warning(engine.run_task_async)
        _installed = True


_WARNED: set[tuple[Any, str]] = set()  # (flow run id, task name) already warned of


def _warning(run):
    @functools.wraps(run)
    def warned(*args: Any, **kwargs: Any):
        _warn_off_slice(kwargs["task"] if "task" in kwargs else args[0] if args else None)
        return run(*args, **kwargs)

    return warned


def _warn_off_slice(task) -> None:
    """A ``mig:``-tagged task about to run under a flow whose task runner is no `MigTaskRunner` (a
    subflow, which never inherits its parent's runner, or a flow that names none) runs in the flow's
    process on no slice: say so once per task and flow run, on the flow run's log."""
    from prefect.context import FlowRunContext

    try:
        ctx = FlowRunContext.get()
        if ctx is None or task is None or getattr(task.fn, "__prefect_mig__", None) or not wants_slice(task):
            return
        runner = getattr(ctx, "task_runner", None)
        if getattr(runner, "slice_task", None) is not None:
            return
        key = (ctx.flow_run.id if ctx.flow_run else None, task.name)
        with _LOCK:
            if key in _WARNED:
                return
            if len(_WARNED) > 10_000:
                _WARNED.clear()
            _WARNED.add(key)
        from prefect.logging import get_run_logger

        tags = sorted(t for t in _tags_of(task) if t.startswith(PROFILE_TAG))
        get_run_logger(ctx).warning(
            "task %r is tagged %s but flow %r runs its tasks with %s, not a MigTaskRunner: it runs here, "
            "in the flow's process, on no MIG slice. Give that flow task_runner=MigTaskRunner() (a subflow "
            "does not inherit its parent's task runner), or make it a prefect_mig.task(task_runner=...).",
            task.name, ", ".join(tags), ctx.flow.name, type(runner).__name__,
        )
    except Exception:  # noqa: BLE001 - a warning must never fail the task
        return


def _routed(run_task):
    @functools.wraps(run_task)
    def run(*args: Any, **kwargs: Any):
        from prefect.context import FlowRunContext

        slice_task = getattr(getattr(FlowRunContext.get(), "task_runner", None), "slice_task", None)
        if slice_task is not None:
            if "task" in kwargs:
                kwargs["task"] = slice_task(kwargs["task"])
            elif args:
                args = (slice_task(args[0]), *args[1:])
        return run_task(*args, **kwargs)

    return run
