"""What a task try on a slice reads from Prefect's run context: is the flow run really cancelled?

Prefect's ``ThreadPoolTaskRunner.__exit__`` calls ``cancel_all()`` on *every* exit, also when the
flow returns normally, and then lets running tasks finish. So a set cancel event alone does not
mean "stop the container". It means so only when

- a `MigTaskRunner` saw ``cancel_all()`` outside a normal exit (an explicit call, or its
  ``__exit__`` unwinding a ``TerminationSignal``/``KeyboardInterrupt``): ``_flow_cancelled``; or
- another runner (Prefect's thread pool, under the per-task form) called ``cancel_all()`` while a
  ``TerminationSignal``/``KeyboardInterrupt`` (Ctrl-C) unwound the flow, which `_Interrupted`
  notes; or
- another runner set the event and the flow run is being cancelled or terminated: Prefect's control
  listener holds a termination intent, or the API shows the flow run ``Cancelling``/``Cancelled``.

Examples:
    ```python
    import threading

    from prefect_mig.integrations.prefect.context import FlowCancelled

    assert not FlowCancelled(runner=None, event=threading.Event(), flow_run_id=None).is_set()
    ```
"""

from __future__ import annotations

import contextvars
import linecache
import re
import sys
import threading
import time
from typing import Any

_RECHECK_S = 2.0  # how often a set foreign cancel event makes us ask the API again


_INTERRUPTED_KEY = ("prefect-mig", "interrupted")


class _Interrupted(threading.Event):
    """Kept among a foreign task runner's cancel events, so its ``cancel_all()`` sets it: that
    call comes from the runner's ``__exit__``, in the thread that unwinds the flow, so the
    exception being handled there says whether the flow was interrupted (anything but an
    ``Exception``, as `MigTaskRunner.__exit__` judges) or ended otherwise."""

    interrupted = False

    def set(self) -> None:
        unwinding = sys.exc_info()[1]
        if unwinding is not None and not isinstance(unwinding, Exception):
            self.interrupted = True
        super().set()


class FlowCancelled:
    """Event-like (``is_set``): the flow run of this task try is really being cancelled."""

    def __init__(self, runner: Any, event: threading.Event | None, flow_run_id: Any,
                 interrupted: _Interrupted | None = None) -> None:
        self.runner, self.event, self.flow_run_id = runner, event, flow_run_id
        self.interrupted = interrupted
        self._verdict = False
        self._checked_at = -_RECHECK_S

    def is_set(self) -> bool:
        own = getattr(self.runner, "_flow_cancelled", None)
        if own is not None:  # a MigTaskRunner knows why cancel_all was called
            return own.is_set()
        if self.event is None or not self.event.is_set():
            return False
        if self.interrupted is not None and self.interrupted.interrupted:
            return True
        now = time.monotonic()
        if not self._verdict and now - self._checked_at >= _RECHECK_S:
            self._checked_at = now
            self._verdict = _flow_run_is_cancelled(self.flow_run_id)
        return self._verdict


def flow_cancelled(ctx) -> FlowCancelled | None:
    """The cancellation signal for task run context `ctx` (None outside a flow's task runner)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    runner = getattr(flow_ctx, "task_runner", None)
    events = getattr(runner, "_cancel_events", None)
    if ctx is None or not isinstance(events, dict):
        return None
    interrupted = None
    if getattr(runner, "_flow_cancelled", None) is None:
        interrupted = events.setdefault(_INTERRUPTED_KEY, _Interrupted())
    return FlowCancelled(runner, events.get(ctx.task_run.id), ctx.task_run.flow_run_id, interrupted)


def _flow_run_is_cancelled(flow_run_id) -> bool:
    try:
        from prefect._internal.control_listener import get_intent

        if get_intent() is not None:  # the runner told this process to cancel or terminate
            return True
    except ImportError:  # older Prefect: no control listener; the API answers below
        pass
    if flow_run_id is None:
        return False
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - an API hiccup is not a cancellation; asked again later
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def picklable_state(state: dict[str, Any]) -> dict[str, Any]:
    """A `MigTaskRunner`'s ``__dict__`` without its runtime state (Docker clients, thread pool,
    events, locks), so a task that ran once still pickles; ``__setstate__`` rebuilds it empty."""
    runtime = ("_launchers", "_flow_cancelled", "_exiting_normally", "_executor", "_cancel_events",
               "_submission_lock", "_worker_thread_ids")
    clean = {k: v for k, v in state.items() if k not in runtime}
    clean.update(_executor=None, _cancel_events={}, _worker_thread_ids=set(), _started=False)
    return clean


def body_context(ctx) -> str:
    """JSON of what a body's Prefect context is made of (``PREFECT_MIG_RUN_CONTEXT``): the run values
    the stand-in answers in an image without Prefect (`prefect_mig.launchers.runtime_shim`), and under
    ``prefect`` the task run and flow run models, names and current tags that an image with Prefect
    hydrates Prefect's own context from (`prefect_mig.launchers.runtime_prefect`)."""
    import json

    from prefect.context import FlowRunContext, TagsContext

    if ctx is None:
        return "{}"
    run = ctx.task_run
    # no task-run parameters: the container binds them from the call it unpickles, values and all
    # (as JSON, a non-JSON value was its repr, and a large one cost seconds on each side)
    values: dict[str, Any] = {"task_run": {
        "id": str(run.id), "name": run.name, "task_name": ctx.task.name, "tags": sorted(run.tags),
        "run_count": run.run_count,
    }}
    # A state's data is never the body's business, and may be what JSON cannot hold: the flow
    # run's state holds the exception that is failing it while its other tasks still start.
    no_data = {"state": {"data"}}
    models: dict[str, Any] = {
        "task_run": run.model_dump(mode="json", exclude=no_data), "task_name": ctx.task.name, "log_prints": ctx.log_prints,
        "tags": sorted(TagsContext.get().current_tags),
    }
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        # no flow-run parameters either: they travel pickled beside the call (`flow_side_values`)
        values["flow_run"] = {
            "id": str(flow_ctx.flow_run.id), "name": flow_ctx.flow_run.name,
            "flow_name": flow_ctx.flow.name if flow_ctx.flow else None, "run_count": flow_ctx.flow_run.run_count,
        }
        models["flow_run"] = flow_ctx.flow_run.model_dump(mode="json", exclude={**no_data, "parameters": True})
        models["flow_name"] = flow_ctx.flow.name if flow_ctx.flow else None
    values["prefect"] = models
    return json.dumps(values, default=repr)


def flow_side_values(flow_ctx) -> dict[str, Any] | None:
    """What goes pickled beside a body's call (`prefect_mig.launchers.docker.DockerLauncher.run`'s
    ``side_values``): the flow run's parameters as its process holds them, for the body's
    ``prefect.runtime.flow_run.parameters`` and ``FlowRunContext``. Not JSON in the run context: a
    large one (an 8 MB list) cost each task of the flow run seconds."""
    if flow_ctx is None or flow_ctx.flow_run is None:
        return None
    return {"flow_parameters": dict(flow_ctx.parameters or {})}


def prefect_env(ctx, network: str | None, own: dict[str, str]) -> dict[str, str]:
    """Prefect settings for a body in an image with Prefect: the flow's API URL (and key, only when
    the container has a network), no temporary API of its own, a writable ``PREFECT_HOME``, and no
    direct API logging (records go through the flow's process). The user's own `env` wins."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    client = getattr(ctx, "client", None)
    url = str(getattr(client, "api_url", "") or settings.api.url or "")
    env = {
        "PREFECT_HOME": "/tmp/.prefect", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false", "PREFECT_MIG_PREFECT_API": "1" if network else "0",
    }
    if url:
        env["PREFECT_API_URL"] = url.rstrip("/")
    if network and settings.api.key is not None:
        env["PREFECT_API_KEY"] = settings.api.key.get_secret_value()
    return {k: v for k, v in env.items() if k not in own}


def log_sink(logger):
    """The launcher's ``on_log``: the runtime's marked lines go to `logger` at their own level (and
    under their own task run, for tasks a body submitted), any other output line at INFO."""
    import json

    from prefect_mig.launchers.runtime_shim import LOG_MARK

    def on_log(line: str) -> None:
        if line.startswith(LOG_MARK):
            try:
                record = json.loads(line[len(LOG_MARK):])
                extra = {k: record[k] for k in ("task_run_id", "flow_run_id", "task_run_name", "task_name", "send_to_api")
                         if k in record}
                logger.log(int(record["level"]), with_source_lines(record["message"]), extra=extra)
                return
            except (ValueError, KeyError, TypeError):
                pass
        logger.info(line)

    return on_log


_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<line>\d+), in ')


def with_source_lines(text: str) -> str:
    """`text` with the source line under each traceback frame that has none: a body's frames name
    the flow's files (it went by pickle), which its container lacks and this process has."""
    if "Traceback (most recent call last):" not in text:
        return text
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        frame = _FRAME.match(line)
        if frame and not (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
            source = linecache.getline(frame["path"], int(frame["line"])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)


def run_in_slice_sync(runner, fn, args: tuple, kwargs: dict) -> Any:
    """``runner.run_in_slice`` in a thread of its own (with this thread's context), this thread
    waiting for it.

    Prefect times out a sync task by raising an exception into the task's thread at its next
    bytecode (SIGALRM in the main thread). Landing in the runner's code just after a lock was
    taken (a logging handler's, before the ``try`` that releases it), it left that lock held, and
    the next log line from any other thread waited forever. Here it lands in this wait instead:
    the try is stopped (its wait withdrawn or its container stopped, the lease released), and the
    exception is raised once that is done. A Ctrl-C of a direct call in the main thread does the
    same."""
    stop = threading.Event()
    return shielded(contextvars.copy_context().run, runner.run_in_slice, fn, args, kwargs, stop=stop,
                    on_interrupt=stop.set)


def own_thread():
    """An anyio limiter for one thread that lasts as long as a wait for a slice, a try or a flow run
    does. On the event loop's default limiter (40 threads, shared with every other thread call of
    the loop, Prefect's too) 40 such waits held every thread, and what they waited for (a lease
    release, another try) queued behind them."""
    import anyio

    return anyio.CapacityLimiter(1)


async def run_in_slice_async(runner, fn, args: tuple, kwargs: dict) -> Any:
    """``runner.run_in_slice`` from a coroutine, cancellable: when Prefect's timeout (or any
    cancellation) cancels the coroutine, the try's wait or container is stopped and its lease
    released before the cancellation goes on (bounded by `_CLEANUP_S`)."""
    import anyio

    stop, finished = threading.Event(), threading.Event()

    def call() -> Any:
        try:
            return runner.run_in_slice(fn, args, kwargs, stop=stop)
        finally:
            finished.set()

    try:  # `asyncio.gather` of 50 tries on the default limiter ran 40
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=own_thread())
    except anyio.get_cancelled_exc_class():
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait, _CLEANUP_S)
        raise


_CLEANUP_S = 60.0  # how long a cancelled async try waits for its container to go and its lease to be released


def announce_lease(ctx, lease, where: str) -> None:
    """A ``prefect-mig.lease.granted`` event (see `events`) about the slice, with the task run, flow
    run and tenant as related resources, instead of an extra client-side Running state that would
    change the run's state history."""
    if ctx is not None:
        lease_event(ctx, lease, "granted", where=where, waited_s=lease.info.waited_ms / 1000, priority=lease.info.priority)


def lease_event(ctx, lease, what: str, **payload: Any) -> None:
    """Emit ``prefect-mig.lease.<what>`` about `lease`, related to the task run of `ctx`."""
    from prefect_mig.integrations.prefect.events import emit_lease_event

    run = ctx.task_run
    emit_lease_event(
        what, lease.slice, lease_id=lease.lease_id, tenant=lease.info.tenant,
        task_run_id=run.id, flow_run_id=run.flow_run_id, payload=payload,
    )


def shielded(fn, *args: Any, undo=None, on_interrupt=None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a helper thread, so that an exception Prefect raises into this
    thread (a sync task's timeout) cannot stop it halfway (a slice granted but never recorded, a
    lease never released). If one lands, wait for `fn` to end, pass its result to `undo`, and raise
    the exception then. One that lands as this returns (its last bytecodes, or the caller's before
    it stores the value) loses the value: what must not leak, `fn` also puts where the caller's
    ``finally`` finds it (`acquire_started`). `on_interrupt` is called as one lands (to cut `fn`
    short)."""
    call: _ShieldedCall | None = None
    interrupted: BaseException | None = None
    while True:  # the exception lands between any two bytecodes: every one of them is in the try,
        try:  # the helper thread's making too (Thread.__init__ is many), so `fn` always runs
            if call is None:
                call = _ShieldedCall(fn, args, kwargs)
            if call.helper.ident is None:
                call.helper.start()
            while not call.done.wait(0.05):  # returns as fn ends; not Thread.join: an exception raised
                pass  # into join breaks is_alive(), one raised into this wait lands within 0.05 s
            break
        except BaseException as exc:  # noqa: BLE001 - Prefect's timeout, raised once into this thread
            interrupted = exc
            if on_interrupt is not None:
                on_interrupt()
    box = call.box
    if interrupted is not None:
        if undo is not None and "value" in box:
            try:
                undo(box["value"])
            except Exception:  # noqa: BLE001 - the lease's TTL and the agent's fencing clean up
                pass
        raise interrupted
    if "error" in box:
        raise box["error"]
    return box.get("value")


class _ShieldedCall:
    """`shielded`'s call of `fn` in its helper thread (not started yet), and what it left."""

    def __init__(self, fn, args: tuple, kwargs: dict) -> None:
        self.box: dict[str, Any] = {}
        self.done = threading.Event()
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.helper = threading.Thread(target=self._run, name="prefect-mig-shielded", daemon=True)

    def _run(self) -> None:
        try:
            self.box["value"] = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self.box["error"] = exc
        finally:
            self.done.set()


def acquire_started(allocator, request, started: list, *, wait: bool, **lease_options: Any):
    """``try_acquire``; a grant comes back as a started (renewing) `Lease`, else the `Queued` request.

    Run it `shielded`, with `undo_acquire` as the undo: the grant becomes a Lease in the helper
    thread, and that thread puts it in `started` before it returns, so a timeout that lands in the
    caller anywhere after (even before ``shielded`` returns) finds it there to release."""
    from prefect_mig.allocator import LeaseInfo

    got = allocator.try_acquire(request, wait=wait)
    return start_lease(allocator, got, started, **lease_options) if isinstance(got, LeaseInfo) else got


def start_lease(allocator, info, started: list, **lease_options: Any):
    """A `Lease` on the grant `info`, put in `started`, then renewing (see `acquire_started`)."""
    from prefect_mig.allocator import Lease

    lease = Lease(allocator, info, **lease_options)
    started.append(lease)
    return lease.start_renewing()


def undo_acquire(allocator):
    """Give back what ``try_acquire`` (or `acquire_started`, `start_lease`) got when the try was
    interrupted: release a grant or a started lease, withdraw a queued request (releasing it if
    it was granted meanwhile)."""
    from prefect_mig.allocator import Lease, LeaseInfo

    def undo(got) -> None:
        if isinstance(got, Lease):
            got.release()
        elif isinstance(got, LeaseInfo):
            allocator.release(got.lease_id, got.fence)
        else:
            allocator.give_up(got.request_id)

    return undo
