"""Runs inside the task container: Prefect's run context for a body, in an image without Prefect.

When the image has no ``prefect`` package, ``install()`` puts a small stand-in into ``sys.modules``
so that a body's own ``from prefect import get_run_logger`` and ``prefect.runtime.task_run`` /
``prefect.runtime.flow_run`` work unchanged:

- ``get_run_logger()`` returns a logger whose records go back to the task run's logs in the flow's
  process, with their levels (one marked line each on stdout, see `LOG_MARK`);
- ``prefect.runtime.task_run``: ``id``, ``name``, ``task_name``, ``tags``, ``run_count``,
  ``parameters`` (the call's own arguments, bound to the body's signature with its defaults, see
  `bind_parameters`); ``prefect.runtime.flow_run``: ``id``, ``name``, ``flow_name``, ``run_count``
  (from ``PREFECT_MIG_RUN_CONTEXT``, JSON written by the flow's process), ``parameters`` (the flow
  run's own values, pickled beside the call and unpickled when first read, see
  `flow_parameters_from`).

Anything else from Prefect (``from prefect import task``, ``import prefect.context``) fails with an
``ImportError`` saying to use an image with Prefect installed. Only the standard library is used.
"""

import json
import logging
import os
import sys
import traceback
import types

LOG_MARK = "\x1eprefect-mig-log "
_ADVICE = (
    "this task container's image has no Prefect: prefect-mig supplies only get_run_logger() and "
    "prefect.runtime.task_run/flow_run (id, name, tags, run_count, parameters). For {what}, use an "
    "image with Prefect installed (pip install prefect of the flow's version)."
)


#: the file name cloudpickle gives code it sends by value (it drops the real one)
BY_VALUE_FILE = "<dynamic-code>"


def traceback_text(exc: BaseException) -> str:
    """``traceback.format_exc()``, with the frames of code sent by value naming the flow-side file
    they came from (their module's ``__file__``, which cloudpickle keeps) for ``<dynamic-code>``."""
    try:
        described = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        pending, seen = [(described, exc)], set()
        while pending:
            summary, raised = pending.pop()
            if summary is None or raised is None or id(raised) in seen:
                continue
            seen.add(id(raised))
            for frame_summary, (frame, _) in zip(summary.stack, traceback.walk_tb(raised.__traceback__)):
                if frame_summary.filename == BY_VALUE_FILE and frame.f_globals.get("__file__"):
                    frame_summary.filename = frame.f_globals["__file__"]
            pending += [(summary.__cause__, raised.__cause__), (summary.__context__, raised.__context__)]
        return "".join(described.format())
    except Exception:  # noqa: BLE001 - never lose the traceback over its file names
        return "".join(traceback.format_exception(exc))


class _FlowFiles(logging.Formatter):
    """A record's traceback as `traceback_text` writes it (the flow's process adds the source lines)."""

    def formatException(self, ei) -> str:
        if ei[1] is None:
            return super().formatException(ei)
        return traceback_text(ei[1]).rstrip("\n")


class RecordsToFlow(logging.Handler):
    """Each record as one marked line on stdout (`LOG_MARK` + JSON: level, message with its traceback
    if any, ``send_to_api`` when false, and the task run and flow run ids Prefect's run loggers
    set), which the flow's process logs to the task run.

    Examples:
        ```python
        import logging

        from prefect_mig.launchers.runtime_shim import RecordsToFlow

        logging.getLogger("example").addHandler(RecordsToFlow())
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_FlowFiles())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"level": record.levelno, "message": self.format(record)}  # with its traceback (exc_info)
            for key in ("task_run_id", "flow_run_id", "task_run_name", "task_name"):  # set by Prefect's run loggers
                if getattr(record, key, None) is not None:
                    fields[key] = str(getattr(record, key))
            if getattr(record, "send_to_api", True) is False:  # Prefect's opt-out: logged, not sent to the API
                fields["send_to_api"] = False
            line = json.dumps(fields)
            sys.stdout.write(LOG_MARK + line + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never break the body
            self.handleError(record)


def get_run_logger(context=None, **kwargs) -> logging.LoggerAdapter:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(h, RecordsToFlow) for h in logger.handlers):
        logger.addHandler(RecordsToFlow())
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return _RunLogger(logger, kwargs)


class _RunLogger(logging.LoggerAdapter):
    """As Prefect's run logger: a call's own ``extra`` (``send_to_api``) is kept beside the logger's."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        return msg, kwargs


class _RunValues(types.ModuleType):
    def __init__(self, name: str, values: dict) -> None:
        super().__init__(name)
        self.__dict__.update(values)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        lazy = self.__dict__.get("_lazy", {})
        if attr in lazy:
            value = lazy[attr]()  # raising, it raises again at the next read
            del lazy[attr]
            setattr(self, attr, value)
            return value
        raise AttributeError(_ADVICE.format(what=f"{self.__name__}.{attr}"))


class _Prefect(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(_ADVICE.format(what=f"prefect.{attr}"), name="prefect")


class _NoMorePrefect:
    """Meta path finder: any ``prefect.*`` module the stand-in lacks fails saying what to do."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("prefect.") and fullname not in sys.modules:
            raise ModuleNotFoundError(_ADVICE.format(what=f"import {fullname}"), name=fullname)
        return None


def _image_has_prefect() -> bool:
    import importlib.util

    return importlib.util.find_spec("prefect") is not None


def install() -> bool:
    """Put the stand-in in ``sys.modules`` unless the image has Prefect; True when it did. Called
    again (a warm process, before each call), it replaces the run values with this call's."""
    if not isinstance(sys.modules.get("prefect"), _Prefect) and _image_has_prefect():
        return False
    values = json.loads(os.environ.get("PREFECT_MIG_RUN_CONTEXT") or "{}")
    prefect = _Prefect("prefect")
    prefect.__path__ = []  # a package, so that `import prefect.runtime` looks in sys.modules
    prefect.get_run_logger = get_run_logger
    logging_module = _RunValues("prefect.logging", {"get_run_logger": get_run_logger})
    runtime = _RunValues("prefect.runtime", {"__path__": []})
    task_run = _RunValues("prefect.runtime.task_run", values.get("task_run", {}))
    flow_run = _RunValues("prefect.runtime.flow_run", values.get("flow_run", {}))
    runtime.task_run, runtime.flow_run = task_run, flow_run
    prefect.logging, prefect.runtime = logging_module, runtime
    sys.modules.update({
        "prefect": prefect, "prefect.logging": logging_module, "prefect.logging.loggers": logging_module, "prefect.runtime": runtime,
        "prefect.runtime.task_run": task_run, "prefect.runtime.flow_run": flow_run,
    })
    if not any(isinstance(finder, _NoMorePrefect) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoMorePrefect())
    return True


def bind_parameters(fn, args: tuple, kwargs: dict) -> None:
    """Set ``prefect.runtime.task_run.parameters`` to the call's arguments by name, defaults
    included, as Prefect's ``get_call_parameters`` binds them: the values themselves, not JSON."""
    import inspect

    task_run = sys.modules.get("prefect.runtime.task_run")
    if not isinstance(task_run, _RunValues):
        return
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        task_run.parameters = dict(bound.arguments)
    except (TypeError, ValueError):  # a signature that cannot bind this call: the body still runs
        task_run.parameters = {}


class FlowParameters(dict):
    """The flow run's parameters; reading one that the flow's process could not pickle (a lock, an
    open client) raises, naming it, its type and why, instead of a stand-in. It pickles as a plain
    dict of those that came (the flow's process has no `runtime_shim` to rebuild it with).

    Examples:
        ```python
        from prefect_mig.launchers.runtime_shim import FlowParameters

        params = FlowParameters({"size": 3}, {"lock": ("_thread.lock", "TypeError: cannot pickle")})
        assert params["size"] == 3 and "lock" not in params
        try:
            params["lock"]
        except RuntimeError as exc:
            assert "could not be sent" in str(exc)
        ```
    """

    def __init__(self, values: dict, unsent: dict) -> None:
        super().__init__(values)
        self.unsent = dict(unsent)

    def __missing__(self, key):
        if key in self.unsent:
            kind, why = self.unsent[key]
            raise RuntimeError(
                f"prefect.runtime.flow_run.parameters[{key!r}]: this flow run parameter (a {kind}) could not be "
                f"sent to the task's container: it cannot be pickled ({why}). Give the flow a value that "
                f"pickles (what the task needs to build it, such as a path or settings) and build it in the task."
            )
        raise KeyError(key)

    def get(self, key, default=None):
        return self[key] if key in self.unsent else super().get(key, default)

    def __reduce__(self):
        return dict, (dict(self),)


def flow_parameters_from(pickled: bytes | None, unsent: dict | None = None) -> None:
    """``prefect.runtime.flow_run.parameters``: the flow run's parameters as the flow's process
    holds them, unpickled when the body first reads them ({} outside a flow run). One that cannot be
    unpickled here (a module the image lacks) raises then, saying so, and fails no body that does
    not read them; one the flow's process could not pickle (`unsent`) raises when read, see
    `FlowParameters`."""
    flow_run = sys.modules.get("prefect.runtime.flow_run")
    if not isinstance(flow_run, _RunValues):
        return
    flow_run.__dict__.pop("parameters", None)
    if pickled is None:
        flow_run.parameters = {}
        return

    def load():
        import pickle

        try:
            values = pickle.loads(pickled)
        except Exception as exc:
            raise RuntimeError(
                f"prefect.runtime.flow_run.parameters: the flow run's parameters cannot be unpickled in this "
                f"task's image ({type(exc).__name__}: {exc}); install what they need in the image."
            ) from exc
        return FlowParameters(values, unsent) if unsent else values

    flow_run._lazy = {"parameters": load}
