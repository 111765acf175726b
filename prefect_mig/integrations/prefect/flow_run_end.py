"""Run something once a flow run ends, in any final state, in the flow's process.

The hook is the flow run's own task runner (``FlowRunContext.task_runner``): Prefect's
``ThreadPoolTaskRunner`` (the default, and `MigTaskRunner`, its subclass) sets every event it holds
in ``_cancel_events`` from ``cancel_all()``, which its ``__exit__`` calls once the flow run has its
final state (and which a cancellation calls too). An event of ours among them runs its callback
when set. The per-task form's runner (``task(task_runner=MigTaskRunner(...))``) is never entered
or exited by the flow, so this is how it learns that the run ended. A task runner without such
events (Dask, Ray) offers no hook: `on_flow_run_end` then returns False and the caller falls back.

Examples:
    ```python
    from prefect.task_runners import ThreadPoolTaskRunner

    from prefect_mig.integrations.prefect.flow_run_end import on_flow_run_end

    class FlowCtx:  # what FlowRunContext.get() gives inside a flow run
        task_runner = ThreadPoolTaskRunner()

    ended = []
    with FlowCtx.task_runner:
        assert on_flow_run_end(FlowCtx, "demo", lambda: ended.append(1))
    assert ended == [1]
    ```
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable


class _OnEnd(threading.Event):
    def __init__(self, callback: Callable[[], object]) -> None:
        super().__init__()
        self.callback = callback

    def set(self) -> None:
        super().set()
        try:
            self.callback()
        except Exception:  # noqa: BLE001 - Prefect's cancel_all must go on to the other events
            logging.getLogger("prefect_mig").warning("a flow run end hook failed", exc_info=True)


def on_flow_run_end(flow_ctx, name: Hashable, callback: Callable[[], object]) -> bool | None:
    """Call `callback()` when the flow run of `flow_ctx` ends (see the module; called again if the
    run is cancelled first, so make it idempotent). One callback per `name` and flow run attempt:
    True when this call registered it, None when one was already registered, False when the
    flow's task runner offers no hook."""
    events = getattr(getattr(flow_ctx, "task_runner", None), "_cancel_events", None)
    if not isinstance(events, dict):
        return False
    key = ("prefect-mig", name)
    if key in events:
        return None
    events[key] = _OnEnd(callback)
    return True


def has_ended(flow_ctx, name: Hashable) -> bool:
    """Whether the callback `on_flow_run_end` registered under `name` for `flow_ctx`'s flow run has
    already been called (the run ended, or its cancellation began)."""
    events = getattr(getattr(flow_ctx, "task_runner", None), "_cancel_events", None)
    hook = events.get(("prefect-mig", name)) if isinstance(events, dict) else None
    return hook is not None and hook.is_set()
