"""Runs inside the task container: load the cloudpickled call, run it, write the outcome back.

This file is copied into the container (with the host's cloudpickle and tblib) through the Docker
API; it needs nothing but the Python standard library and those two. Exit codes: 0 when an outcome
(a value or an exception) was written, 3 when not even that was possible.

In an image with Prefect, the body runs inside Prefect's own flow run and task run context
(``runtime_prefect.py``); without, a stand-in answers the few names a body may use
(``runtime_shim.py``).

With ``--serve`` it stays up for a warm slice (``prefect_mig.launchers.warm``): it reads calls from
stdin, each a frame (8-byte big-endian length, then cloudpickled ``{"env": ..., "call": payload}``),
and writes each outcome as a frame to the stdout it was started with. Everything the body prints
goes to stderr instead (fd 1 is pointed there), followed by `END_MARK` once the call is done, so the
host knows that a call's log lines are all in. The per-call environment replaces the previous
call's. Functions that travel by value get the globals the first call of their module left, so
module globals (a loaded model, a ``functools.cache``) persist between calls.

The payload is unpickled inside the error handling, so a module the image lacks comes back as
the ``ModuleNotFoundError`` it is. An exception travels as (type, args, ``__dict__``) plus its
traceback (tblib) and text, so the host rebuilds the same type even when its ``__init__`` takes
other arguments than its ``args`` (see ``prefect_mig.launchers.outcome``).
"""

import json
import os
import struct
import sys
import threading
import time
import traceback
import types

HOME = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # in the container; the host imports END_MARK from here
    sys.path.insert(0, os.path.join(HOME, "site"))

import cloudpickle  # noqa: E402


def main() -> int:
    try:
        _carried_env()
        stand_in = _install_shim()
        with open(os.path.join(HOME, "payload.pkl"), "rb") as f:
            fn, args, kwargs, *side = cloudpickle.load(f)
        _add_project_sources(side[0] if side else {})
        with _prefect_context(stand_in, fn, args, kwargs, side[0] if side else {}):
            value = fn(*args, **kwargs)
        outcome = ("ok", value, None)
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the flow
        outcome = _error_outcome(exc)
    data = _dumps(outcome)
    tmp = os.path.join(HOME, "result.pkl.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(HOME, "result.pkl"))
    sys.stdout.flush()
    return 0


def _carried_env() -> None:
    """Environment values too large for the container's own environment (Linux caps one at 128
    KiB), which the launcher put in ``env.json`` beside the payload."""
    path = os.path.join(HOME, "env.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            os.environ.update(json.load(f))


class _ProjectSources:
    """Imports the project modules whose source came with a call (the flow's process had not loaded
    them: ``prefect_mig.launchers.project_sources``); last on ``sys.meta_path``, so a module the
    image itself has wins."""

    def __init__(self) -> None:
        self.sources: dict = {}  # module name -> (flow-side file, source, is_package)

    def find_spec(self, name, path=None, target=None):
        found = self.sources.get(name)
        if found is None:
            return None
        import importlib.util

        spec = importlib.util.spec_from_loader(name, self, origin=found[0], is_package=found[2])
        spec.has_location = True  # __file__: the flow-side file, as tracebacks name it
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        import linecache

        file, source, _ = self.sources[module.__spec__.name]
        linecache.cache[file] = (len(source), None, source.splitlines(True), file)
        exec(compile(source, file, "exec"), module.__dict__)


_PROJECT_SOURCES = _ProjectSources()


def _add_project_sources(side: dict) -> None:
    data = side.get("project_sources")
    if data:
        _PROJECT_SOURCES.sources.update(cloudpickle.loads(data))
        if _PROJECT_SOURCES not in sys.meta_path:
            sys.meta_path.append(_PROJECT_SOURCES)


END_MARK = "\x1eprefect-mig-call-end"
_MODULE_GLOBALS: dict = {}  # module name -> the globals its by-value functions share in this process


def serve() -> int:
    """The warm loop: one call per frame on stdin until stdin closes."""
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the body's prints (and the shim's log lines) go to stderr, the protocol stays clean
    calls = os.fdopen(os.dup(0), "rb")
    # a body that reads stdin (input(), a prompt) gets EOF as in a cold container, instead of waiting
    # forever for the next call's frame (or reading it)
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.close(nothing)
    previous: set = set()
    while True:
        head = calls.read(8)
        if len(head) < 8:
            return 0
        message = calls.read(struct.unpack(">Q", head)[0])
        try:
            request = cloudpickle.loads(message)
            env = request["env"]
            for name in previous - set(env):
                os.environ.pop(name, None)
            os.environ.update(env)
            previous = set(env)
            stand_in = _install_shim()
            fn, args, kwargs, *side = cloudpickle.loads(request["call"])
            _add_project_sources(side[0] if side else {})
            with _prefect_context(stand_in, fn, args, kwargs, side[0] if side else {}):
                value = _with_kept_globals(fn)(*args, **kwargs)
            outcome = ("ok", value, None)
        except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the flow
            outcome = _error_outcome(exc)
        data = _dumps(outcome)
        sys.stdout.flush()
        sys.stderr.write(END_MARK + "\n")
        sys.stderr.flush()
        results.write(struct.pack(">Q", len(data)) + data)
        results.flush()


def _with_kept_globals(fn):
    """`fn` bound to the globals earlier calls of its module left (a function pickled by value comes
    with fresh globals each time); names new in this call are added, existing ones kept."""
    if not isinstance(fn, types.FunctionType) or fn.__module__ in sys.modules:
        return fn  # importable here: its module's globals persist anyway
    kept = _MODULE_GLOBALS.setdefault(fn.__module__, fn.__globals__)
    if kept is fn.__globals__:
        return fn
    for name, value in fn.__globals__.items():
        kept.setdefault(name, value)
    again = types.FunctionType(fn.__code__, kept, fn.__name__, fn.__defaults__, fn.__closure__)
    again.__kwdefaults__, again.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    again.__dict__.update(fn.__dict__)
    return again


def _dumps(outcome: tuple) -> bytes:
    try:
        return cloudpickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an unpicklable return value
        text = "the task's return value cannot be pickled:\n" + traceback.format_exc()
        return cloudpickle.dumps(("error", None, text, "an unpicklable return value", text.splitlines()[-1], None))


def _install_shim() -> bool:
    """Without Prefect in the image, a stand-in answers ``get_run_logger`` and ``prefect.runtime``
    (True when it was installed)."""
    path = os.path.join(HOME, "runtime_shim.py")
    if os.path.exists(path):
        if HOME not in sys.path:
            sys.path.insert(0, HOME)
        import runtime_shim

        return runtime_shim.install()
    return False


def _prefect_context(stand_in: bool, fn, args, kwargs, side: dict):
    """With Prefect in the image, its own flow run and task run context around the body; without
    it, the stand-in's task-run parameters bound from this call. `side`: values pickled each on its
    own beside the call (``flow_parameters``: the flow run's, unpickled when first read;
    ``flow_parameters_unsent``: those the flow's process could not pickle))."""
    if stand_in or not os.path.exists(os.path.join(HOME, "runtime_prefect.py")):
        import contextlib

        if stand_in:
            import runtime_shim

            runtime_shim.bind_parameters(fn, args, kwargs)
            runtime_shim.flow_parameters_from(side.get("flow_parameters"), side.get("flow_parameters_unsent"))
        return contextlib.nullcontext()
    import runtime_prefect

    return runtime_prefect.hydrated(fn, args, kwargs, side.get("flow_parameters"), side.get("flow_parameters_unsent"))


#: the file name cloudpickle gives code it sends by value (it drops the real one)
BY_VALUE_FILE = "<dynamic-code>"


def _traceback_text(exc: BaseException) -> str:
    import runtime_shim

    return runtime_shim.traceback_text(exc)


def _error_outcome(exc: BaseException) -> tuple:
    tb = _traceback_text(exc)
    kind = type(exc)
    name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        message = repr(exc.args)
    try:
        from tblib import Traceback

        frames = Traceback(exc.__traceback__).as_dict()
        link = frames
        while link:
            frame = link["tb_frame"]
            if frame["f_code"]["co_filename"] == BY_VALUE_FILE and frame["f_globals"].get("__file__"):
                frame["f_code"]["co_filename"] = frame["f_globals"]["__file__"]
            link = link.get("tb_next")
    except Exception:  # noqa: BLE001 - the text traceback still travels
        frames = None
    try:
        parts = cloudpickle.dumps((kind, exc.args, dict(getattr(exc, "__dict__", {}))))
    except Exception:  # noqa: BLE001 - unpicklable args or attributes: the type name and text travel
        parts = None
    return ("error", parts, tb, name, message, frames)


#: how long the interpreter may take to exit once the outcome is written (its atexit handlers, the
#: threads it joins) before the process ends anyway
EXIT_GRACE_S = 5.0


def _exit_by(code: int, grace_s: float) -> None:
    """End the process with `code` `grace_s` from now if the interpreter has not exited by then.
    Python joins the non-daemon threads and ``multiprocessing`` children a body left running before
    it exits, and the host waits for the container to exit: the task, its outcome written, would keep
    its slice until they end (forever for a server thread). The container's exit stops them."""

    def end() -> None:
        time.sleep(grace_s)
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        children = sys.modules.get("multiprocessing")
        left += [f"process {p.name}" for p in (children.active_children() if children else [])]
        sys.stderr.write(f"prefect-mig: the task body left {', '.join(left) or 'something'} running; its outcome is "
                         f"written and the task container exits without waiting for it ({grace_s:g} s).\n")
        sys.stderr.flush()
        os._exit(code)

    try:
        threading.Thread(target=end, name="prefect-mig-exit", daemon=True).start()
    except RuntimeError:  # no thread to spare (the body used up the container's pids_limit): end now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    code = serve() if sys.argv[1:] == ["--serve"] else main()
    _exit_by(code, EXIT_GRACE_S)
    sys.exit(code)
