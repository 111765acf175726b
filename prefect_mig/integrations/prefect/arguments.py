"""A task's arguments as the body's container can unpickle them: without Prefect's own container types.

Prefect resolves the futures in a task's arguments but keeps the containers' types: the result of
``embed.map(...)`` reaches the next task as a ``prefect.futures.PrefectFutureList`` of values.
cloudpickle pickles that class by reference, and the default image (``prefect-mig-python:bookworm``)
has no Prefect to import it from. `plain_arguments` turns every list, tuple, dict, set or frozenset
subclass defined in Prefect into the builtin type, at any depth inside builtin containers.

Examples:
    ```python
    from prefect.futures import PrefectFutureList

    from prefect_mig.integrations.prefect.arguments import plain_arguments

    args, kwargs = plain_arguments((PrefectFutureList([1, 2]),), {"x": {"y": PrefectFutureList([3])}})
    assert type(args[0]) is list and args[0] == [1, 2]
    assert type(kwargs["x"]["y"]) is list
    ```
"""

from __future__ import annotations

from typing import Any

_BUILTINS = (list, tuple, dict, set, frozenset)


def plain_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args` and `kwargs`, with Prefect's container types made builtin (the same objects when none is)."""
    return _plain(args, set()), _plain(kwargs, set())


def _plain(value: Any, open_ids: set[int]) -> Any:
    # One pass over the containers only, rebuilding one only when something inside it changed.
    # Prefect has already walked the same arguments (in Python) to resolve their futures, so this
    # adds a fraction of that.
    kind = type(value)
    if kind in _BUILTINS:
        builtin = kind
    else:
        builtin = next((b for b in _BUILTINS if isinstance(value, b)), None)
        if builtin is None or not kind.__module__.startswith("prefect."):
            return value  # not a container, or the user's own subclass (pickled by its own module)
    if id(value) in open_ids:
        return value  # a container inside itself
    open_ids.add(id(value))
    try:
        if builtin is dict:
            items = {k: _plain(v, open_ids) for k, v in value.items()}
            same = kind is dict and all(items[k] is v for k, v in value.items())
        else:
            items = [_plain(v, open_ids) for v in value]
            same = kind is builtin and all(a is b for a, b in zip(items, value))
    finally:
        open_ids.discard(id(value))
    if same:
        return value
    return items if builtin in (dict, list) else builtin(items)
