"""Runs inside the task container: load the cloudpickled call, run it, write the outcome back.

This file is copied into the container (with the host's cloudpickle and tblib) through the Docker
API; it needs nothing but the Python standard library and those two. Exit codes: 0 when an outcome
(a value or an exception) was written, 3 when not even that was possible.

In an image with Prefect, the body runs inside Prefect's own flow run and task run context
(``runtime_prefect.py``); without, a stand-in answers the few names a body may use
(``runtime_shim.py``).

The payload is unpickled inside the error handling, so a module the image lacks comes back as
the ``ModuleNotFoundError`` it is. An exception travels as (type, args, ``__dict__``) plus its
traceback (tblib) and text, so the host rebuilds the same type even when its ``__init__`` takes
other arguments than its ``args`` (see ``prefect_mig.launchers.outcome``).
"""

import os
import sys
import traceback

HOME = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HOME, "site"))

import cloudpickle  # noqa: E402


def main() -> int:
    try:
        stand_in = _install_shim()
        with open(os.path.join(HOME, "payload.pkl"), "rb") as f:
            fn, args, kwargs = cloudpickle.load(f)
        with _prefect_context(stand_in, fn, args, kwargs):
            value = fn(*args, **kwargs)
        outcome = ("ok", value, None)
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the flow
        outcome = _error_outcome(exc)
    try:
        data = cloudpickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an unpicklable return value
        text = "the task's return value cannot be pickled:\n" + traceback.format_exc()
        data = cloudpickle.dumps(("error", None, text, "an unpicklable return value", text.splitlines()[-1], None))
    tmp = os.path.join(HOME, "result.pkl.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(HOME, "result.pkl"))
    sys.stdout.flush()
    return 0


def _install_shim() -> bool:
    """Without Prefect in the image, a stand-in answers ``get_run_logger`` and ``prefect.runtime``
    (True when it was installed)."""
    path = os.path.join(HOME, "runtime_shim.py")
    if os.path.exists(path):
        sys.path.insert(0, HOME)
        import runtime_shim

        return runtime_shim.install()
    return False


def _prefect_context(stand_in: bool, fn, args, kwargs):
    """With Prefect in the image, its own flow run and task run context around the body."""
    if stand_in or not os.path.exists(os.path.join(HOME, "runtime_prefect.py")):
        import contextlib

        return contextlib.nullcontext()
    import runtime_prefect

    return runtime_prefect.hydrated(fn, args, kwargs)


def _error_outcome(exc: BaseException) -> tuple:
    tb = traceback.format_exc()
    kind = type(exc)
    name = f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        message = repr(exc.args)
    try:
        from tblib import Traceback

        frames = Traceback(exc.__traceback__).as_dict()
    except Exception:  # noqa: BLE001 - the text traceback still travels
        frames = None
    try:
        parts = cloudpickle.dumps((kind, exc.args, dict(getattr(exc, "__dict__", {}))))
    except Exception:  # noqa: BLE001 - unpicklable args or attributes: the type name and text travel
        parts = None
    return ("error", parts, tb, name, message, frames)


if __name__ == "__main__":
    sys.exit(main())
