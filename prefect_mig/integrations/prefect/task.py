"""`prefect_mig.task`: Prefect's ``@task`` that also takes ``task_runner=MigTaskRunner(...)``.

Prefect's own ``@task`` has no ``task_runner`` argument. This decorator returns a real
``prefect.Task`` around a proxy that leases a slice and runs the body in a container, so
``.submit``, ``.map``, direct calls, ``wait_for``, retries (a fresh lease per try), timeouts,
caching and ``with_options`` behave as with Prefect's own tasks.

Examples:
    ```python
    from prefect_mig import MigTaskRunner, task

    @task(task_runner=MigTaskRunner(profile="1g.10gb", priority=5), retries=1)
    def infer(batch: list[int]) -> int:
        return sum(batch)

    assert infer.name == "infer" and infer.retries == 1
    ```
"""

from __future__ import annotations

from typing import Any

import prefect

from prefect_mig.errors import ConfigError
from prefect_mig.integrations.prefect.profiles import NO_SLICE_TAG, check_tags
from prefect_mig.integrations.prefect.runner import MigTaskRunner, slice_body


def task(__fn=None, *, task_runner: MigTaskRunner | None = None, **task_kwargs: Any):
    """Drop-in for ``prefect.task`` that also accepts ``task_runner=MigTaskRunner(...)``.

    Without `task_runner` it is exactly ``prefect.task`` (a flow-level `MigTaskRunner` may still
    send the task to a slice when it is tagged ``mig:<profile>``).
    """
    if task_runner is not None and not isinstance(task_runner, MigTaskRunner):
        raise TypeError(
            f"task_runner must be a MigTaskRunner, not {type(task_runner).__name__}; Prefect's own task "
            "runners are set on the flow (@flow(task_runner=...))."
        )

    check_tags(task_kwargs.get("tags") or ())
    if task_runner is not None and NO_SLICE_TAG in (task_kwargs.get("tags") or ()):
        raise ConfigError(
            f"tags: {NO_SLICE_TAG!r} keeps a task off slices, and task_runner=MigTaskRunner(...) sends it to "
            "one: give one or the other.",
            field="tags", value=NO_SLICE_TAG,
        )

    def decorate(fn):
        if task_runner is None:
            return prefect.task(fn, **task_kwargs)
        if isinstance(fn, (classmethod, staticmethod)):  # Prefect takes these apart itself: wrap what it calls
            task_kwargs.setdefault("name", fn.__func__.__name__)
            return prefect.task(type(fn)(slice_body(fn.__func__, task_runner)), **task_kwargs)
        # Prefect's own default; a callable object has no __name__
        task_kwargs.setdefault("name", getattr(fn, "__name__", type(fn).__name__))
        return prefect.task(slice_body(fn, task_runner), **task_kwargs)

    if __fn is not None:
        return decorate(__fn)
    return decorate
