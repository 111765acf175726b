"""Runs inside the task container: Prefect's own run context for a body, in an image with Prefect.

``hydrated(fn, args, kwargs)`` enters, around the body, what a Prefect worker's process has around a
task: a ``FlowRunContext`` (the flow run, its parameters, a task runner for nested submissions) and a
``TaskRunContext`` (the task run with its run count, the call's parameters), plus the caller's
``tags(...)``. So ``TaskRunContext.get().task_run.id`` is the engine's task run id,
``prefect.runtime`` answers from the real context, and ``get_run_logger()`` is Prefect's own.

The models come from the flow's process as JSON (``PREFECT_MIG_RUN_CONTEXT``, key ``prefect``): the
container asks the API for nothing to set itself up.

Where things go:

- Records of ``get_run_logger()`` (the body's and those of tasks it submits) travel as marked lines on
  stdout to the flow's process, which sends them to the API under the record's own task run id
  (`prefect_mig.integrations.prefect.context.log_sink`). No network is needed for logs.
- Submitting a task from the body (``.submit``, ``.map``) needs the Prefect API: it works when the
  container has a network from which ``PREFECT_API_URL`` is reachable (``MigTaskRunner(network=...)``);
  with networking off (the default) it fails saying so. Nested tasks run in threads of this container,
  on the body's slice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

_NO_API = (
    "submitting a task from a task body needs the Prefect API, and this task container has networking "
    "off (prefect-mig's default). Give the runner a network from which the API is reachable: "
    "MigTaskRunner(network='host') on the flow's host, or a Docker network and env={{'PREFECT_API_URL': ...}}. "
    "(task {name!r})"
)


def _records_to_flow() -> None:
    """Prefect's run loggers write marked lines for the flow's process instead of their console and
    API handlers (the flow's process sends them to the API, see the module docstring)."""
    from prefect.logging.configuration import ensure_logging_setup
    from runtime_shim import RecordsToFlow

    ensure_logging_setup()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(RecordsToFlow())
        logger.setLevel(logging.DEBUG)
        logger.propagate = False


def _task_runner(api: bool):
    from prefect.task_runners import ThreadPoolTaskRunner

    class NoApiTaskRunner(ThreadPoolTaskRunner):
        def submit(self, task, *args, **kwargs):
            raise RuntimeError(_NO_API.format(name=getattr(task, "name", task)))

        def duplicate(self):
            return type(self)()

    return ThreadPoolTaskRunner() if api else NoApiTaskRunner()


def _parameters(fn, args: tuple, kwargs: dict) -> dict:
    import inspect

    from prefect.utilities.callables import get_call_parameters

    try:
        if hasattr(fn, "__prefect_self__") or hasattr(fn, "__prefect_cls__"):
            # a task method: the engine passed its instance (or class) as the first argument
            # already, and Prefect's binding would add the one the function carries once more
            def unbound(*args, **kwargs):
                return None

            unbound.__signature__ = inspect.signature(fn)
            return get_call_parameters(unbound, args, kwargs)
        return get_call_parameters(fn, args, kwargs)
    except Exception:  # noqa: BLE001 - a signature Prefect cannot bind: the body still runs
        return {}


@contextlib.contextmanager
def hydrated(fn, args: tuple, kwargs: dict, flow_parameters: bytes | None = None, unsent: dict | None = None):
    """Prefect's flow run and task run context around ``fn(*args, **kwargs)`` (see the module);
    `flow_parameters`: the flow run's, pickled by the flow's process; `unsent`: those it could not
    pickle, which raise when read (`runtime_shim.FlowParameters`)."""
    values = json.loads(os.environ.get("PREFECT_MIG_RUN_CONTEXT") or "{}").get("prefect")
    if not values:  # not called from a task run (a bare DockerLauncher.run)
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun, TaskRun
    from prefect.context import FlowRunContext, TaskRunContext, tags
    from prefect.flows import Flow
    from prefect.results import get_result_store
    from prefect.tasks import Task

    from prefect._internal.result_records import ResultRecordMetadata

    # as Prefect's own hydrated_context does: in a fresh process these models are not built yet
    types = {"Flow": Flow, "Task": Task, "ResultRecordMetadata": ResultRecordMetadata}
    FlowRunContext.model_rebuild(_types_namespace=types)
    TaskRunContext.model_rebuild(_types_namespace=types)
    _records_to_flow()
    api = os.environ.get("PREFECT_MIG_PREFECT_API") == "1"
    client = get_client(sync_client=True)
    task_run = TaskRun.model_validate(values["task_run"])
    with contextlib.ExitStack() as stack:
        if values.get("flow_run"):
            parameters = _flow_parameters(flow_parameters)
            if unsent:
                from runtime_shim import FlowParameters

                parameters = FlowParameters(parameters, unsent)
            flow_run = FlowRun.model_validate(values["flow_run"]).model_copy(update={"parameters": parameters})

            def flow_stand_in():  # the flow's own function stays in the flow's process
                return None

            runner = stack.enter_context(_task_runner(api))
            stack.enter_context(FlowRunContext(
                flow=Flow(flow_stand_in, name=values.get("flow_name") or flow_run.flow_id.hex),
                flow_run=flow_run, client=client, task_runner=runner, result_store=get_result_store(),
                parameters=parameters, detached=True,
            )).parameters = parameters  # the context's validation made it a plain dict
        task = Task(fn, name=values.get("task_name") or task_run.name, tags=set(task_run.tags))
        stack.enter_context(TaskRunContext(
            task=task, task_run=task_run, client=client, parameters=_parameters(fn, args, kwargs),
            result_store=get_result_store(), log_prints=bool(values.get("log_prints")),
        ))
        stack.enter_context(tags(*values.get("tags", [])))
        try:
            yield
        finally:
            if api:
                _drain_events()


def _flow_parameters(pickled: bytes | None) -> dict:
    """The flow run's parameters as its process holds them (they travel pickled, not in the run
    context's JSON: a large one cost every task of the flow run seconds). One that cannot be
    unpickled here (a module the image lacks) leaves them empty, with a warning in the task's log."""
    if pickled is None:
        return {}
    import pickle

    try:
        return pickle.loads(pickled)
    except Exception as exc:  # noqa: BLE001 - the body may not read them
        logging.getLogger("prefect.task_runs").warning(
            "the flow run's parameters cannot be unpickled in this task's image (%s: %s), so the body sees "
            "none; install what they need in the image.", type(exc).__name__, exc)
        return {}


def _drain_events() -> None:
    """Send what nested task runs emitted (their states travel as events) before the container ends."""
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
    except Exception:  # noqa: BLE001 - the body's outcome matters more than a late event
        pass
