"""Turn what a task container wrote back (``runtime_entry.py``) into a value or a raised exception.

An exception comes back as the same type, with its ``args``, its attributes and the container's
traceback (tblib), even when its ``__init__`` takes other arguments than its ``args``
(``BadBatch(batch_id, reason)``). When the type cannot be rebuilt here (a module only the image has),
a `TaskBodyError` names the original type and message and carries the traceback text.

Examples:
    ```python
    from prefect_mig.launchers.outcome import value_of

    assert value_of(("ok", 42, None)) == 42
    ```
"""

from __future__ import annotations

from typing import Any

import cloudpickle

from prefect_mig.errors import LaunchError, RemoteTraceback, TaskBodyError


def load_outcome(data: bytes) -> tuple:
    """The outcome the container wrote, as `value_of` takes it; one that cannot be loaded here (a
    value whose type comes from a module only the image has) becomes an outcome that raises so."""
    try:
        return cloudpickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - whatever loading it raised, the value is lost to this process
        return ("unloadable", exc, None)


def value_of(outcome: tuple) -> Any:
    """Return the outcome's value, or raise its exception from a `RemoteTraceback`."""
    kind, parts, tb = outcome[:3]
    if kind == "ok":
        return parts
    if kind == "unloadable":
        raise LaunchError(
            f"the task body returned, but its value cannot be loaded in the flow's process "
            f"({type(parts).__name__}: {parts}): its type comes from a module the task's image has and this "
            "process lacks (or cannot unpickle). Return plain values (numbers, strings, lists, dicts, arrays), "
            "or install that module where the flow runs too."
        ) from parts
    name, message, frames = outcome[3:6] if len(outcome) >= 6 else ("an exception", (tb.strip().splitlines() or [""])[-1], None)
    exc = _rebuilt(parts)
    if exc is None:
        raise TaskBodyError(
            f"the task body raised {name}: {message}\n--- raised in the task container ---\n{tb}",
            type_name=name,
            original_message=message,
            traceback=tb,
        )
    if frames is not None:
        try:
            from tblib import Traceback

            exc = exc.with_traceback(Traceback.from_dict(frames).as_traceback())
        except Exception:  # noqa: BLE001 - the text traceback is the cause either way
            pass
    raise exc from RemoteTraceback(tb)


def _rebuilt(parts: bytes | None) -> BaseException | None:
    """The exception rebuilt without calling its ``__init__`` (its args and attributes restored)."""
    if parts is None:
        return None
    try:
        kind, args, state = cloudpickle.loads(parts)
    except Exception:  # noqa: BLE001 - the type or an attribute does not exist on this side
        return None
    try:
        exc = kind.__new__(kind, *args)
    except Exception:  # noqa: BLE001 - a __new__ with its own signature
        try:
            exc = kind.__new__(kind)
        except Exception:  # noqa: BLE001
            return None
    exc.args = args
    try:
        exc.__dict__.update(state)
    except AttributeError:  # a type without __dict__ (slots): its args are what there is
        pass
    return exc
