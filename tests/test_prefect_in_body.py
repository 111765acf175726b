"""A body in an image with Prefect runs inside Prefect's own run context (issue 11, What to build 2):
the engine's task run and flow run, ``get_run_logger()`` records in the task run's logs on the API,
and tasks submitted from the body. Real Prefect API, real Redis, real Docker, an image built by
``prefect-mig image build``."""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect import task as prefect_task

from prefect_mig import MigTaskRunner, task

from .prefect_fixtures import read_task_run_states

pytestmark = [pytest.mark.docker, pytest.mark.redis]


def reads_its_context(n: int, scale: float = 1.0):
    from prefect import runtime
    from prefect.context import FlowRunContext, TagsContext, TaskRunContext

    ctx = TaskRunContext.get()
    return {
        "task_run_id": ctx.task_run.id, "run_count": ctx.task_run.run_count, "parameters": ctx.parameters,
        "flow_run_id": FlowRunContext.get().flow_run.id, "runtime_task_run_id": runtime.task_run.id,
        "runtime_flow_name": runtime.flow_run.flow_name, "tags": set(TagsContext.get().current_tags),
    }


def test_a_body_in_an_image_with_prefect_runs_in_the_engines_task_run_context(cluster, prefect_image):
    from prefect.context import tags

    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image))(reads_its_context)

    @flow(name="context-check")
    def pipeline():
        with tags("caller-tag"):
            future = body.submit(3)
        return future.result(), future.task_run_id

    seen, engine_task_run_id = pipeline()
    assert seen["task_run_id"] == engine_task_run_id == uuid.UUID(str(seen["runtime_task_run_id"]))
    assert seen["run_count"] == 1 and seen["parameters"] == {"n": 3, "scale": 1.0}
    assert seen["runtime_flow_name"] == "context-check"
    assert "caller-tag" in seen["tags"]
    from prefect.client.orchestration import get_client

    read_task_run_states(engine_task_run_id, until=lambda states: states and states[-1].is_final())
    with get_client(sync_client=True) as client:
        assert client.read_task_run(engine_task_run_id).flow_run_id == seen["flow_run_id"]


def logs_a_line(marker: str) -> int:
    from prefect import get_run_logger

    get_run_logger().warning("from the body %s", marker)
    return 1


def _task_run_logs(task_run_id, needle: str, timeout_s: float = 60.0) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    found: list = []
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:  # read at least once
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
            found = [log for log in logs if needle in log.message]
            if found or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    return found


def test_a_bodys_get_run_logger_record_is_readable_from_the_api_under_its_task_run(cluster, prefect_image):
    # networking stays off: records reach the API through the flow's process
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image))(logs_a_line)
    marker = uuid.uuid4().hex

    @flow
    def pipeline():
        future = body.submit(marker)
        future.result()
        return future.task_run_id

    task_run_id = pipeline()
    found = _task_run_logs(task_run_id, f"from the body {marker}")
    assert len(found) == 1, "the record is in the task run's logs exactly once"
    assert found[0].level == 30  # WARNING


def logs_and_reports_its_run(marker: str):
    import socket

    from prefect import get_run_logger, runtime
    from prefect.context import TaskRunContext

    get_run_logger().warning("warm call %s", marker)
    return str(TaskRunContext.get().task_run.id), str(runtime.task_run.id), socket.gethostname()


def test_consecutive_warm_calls_in_an_image_with_prefect_each_run_in_their_own_task_runs_context(cluster, prefect_image):
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image, keep_warm_s=600))(logs_and_reports_its_run)
    markers = [uuid.uuid4().hex, uuid.uuid4().hex]

    @flow
    def pipeline():
        runs = []
        for marker in markers:  # one after the other: the second reuses the first's warm process
            future = body.submit(marker)
            runs.append((future.result(), future.task_run_id))
        return runs

    (first, first_id), (second, second_id) = pipeline()
    assert first_id != second_id
    assert first[:2] == (str(first_id), str(first_id)) and second[:2] == (str(second_id), str(second_id))
    assert first[2] == second[2], "both calls ran in one container"
    assert sum(1 for e in cluster.events() if e["type"] == "lease.granted") == 1
    for marker, run_id in zip(markers, (first_id, second_id)):
        assert len(_task_run_logs(run_id, f"warm call {marker}")) == 1, "each call's record is under its own task run"
    for marker, run_id in zip(markers, (second_id, first_id)):  # both records are in by now
        assert _task_run_logs(run_id, f"warm call {marker}", timeout_s=0) == []


def submits_a_task(x: int):
    from prefect import get_run_logger, task

    @task(name="nested-in-a-slice")
    def add_one(y: int) -> int:
        get_run_logger().info("nested task ran with %s", y)
        return y + 1

    future = add_one.submit(x)
    return future.result(), str(future.task_run_id)


def test_a_nested_submit_from_a_body_runs_and_its_result_comes_back(cluster, prefect_image):
    # the API is on the flow's host (127.0.0.1): the container needs the host's network for it
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image, network="host"))(submits_a_task)

    @flow
    def pipeline():
        future = body.submit(41)
        return future.result(), future.task_run_id

    (value, nested_id), outer_id = pipeline()
    assert value == 42
    from prefect.client.orchestration import get_client

    from prefect.exceptions import ObjectNotFound

    nested = None
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:  # Prefect 3 records a task run from its events, a moment after they happen
                nested = client.read_task_run(uuid.UUID(nested_id))
            except ObjectNotFound:
                nested = None
            if nested is not None and nested.state is not None and nested.state.is_completed():
                break
            time.sleep(0.5)
        outer = client.read_task_run(outer_id)
    assert nested is not None, "the nested task run was never recorded"
    assert nested.name.startswith("nested-in-a-slice") and nested.state.is_completed()
    assert nested.flow_run_id == outer.flow_run_id
    assert _task_run_logs(nested.id, "nested task ran with 41"), "the nested task's record is under its own run"


def test_a_nested_submit_with_networking_off_fails_saying_to_give_the_runner_a_network(cluster, prefect_image):
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image))(submits_a_task)

    @flow
    def pipeline():
        return body.submit(41).result()

    with pytest.raises(RuntimeError, match=r"networking off.*network='host'"):
        pipeline()


class Scaler:
    unit = 10

    def __init__(self, factor: int):
        self.factor = factor

    @prefect_task(tags=["mig:1g.10gb"])
    def scale(self, x: int):
        from prefect.context import TaskRunContext

        seen = TaskRunContext.get().parameters
        return self.factor * x, type(seen.get("self")).__name__, seen.get("x")

    @prefect_task(tags=["mig:1g.10gb"])
    @classmethod
    def units(cls, x: int):
        from prefect.context import TaskRunContext

        return cls.unit * x, sorted(TaskRunContext.get().parameters)


def test_a_task_on_a_method_in_an_image_with_prefect_sees_its_instance_in_the_task_runs_parameters(cluster, prefect_image):
    """Prefect passes a task method's instance as `self` and its class as `cls`; the body's
    TaskRunContext must name them once (Prefect's own binding adds them again when the function
    still carries the instance it was last looked up on)."""

    @flow(task_runner=MigTaskRunner(image=prefect_image))
    def pipeline():
        return Scaler(3).scale.submit(2).result(), Scaler.units.submit(3).result()

    assert pipeline() == ((6, "Scaler", 2), (30, ["cls", "x"]))


def reads_flow_parameters():
    from prefect import runtime
    from prefect.context import FlowRunContext

    return FlowRunContext.get().parameters, runtime.flow_run.parameters, FlowRunContext.get().flow_run.parameters


def test_a_body_in_an_image_with_prefect_sees_its_flow_runs_parameters_as_the_flow_holds_them(cluster, prefect_image):
    """They travel pickled beside the call, not as JSON in the run context."""
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image))(reads_flow_parameters)
    when = datetime.datetime(2026, 11, 27, 6, 0, tzinfo=datetime.timezone.utc)

    @flow
    def pipeline(when: datetime.datetime, scale: int = 2):
        return body()

    expected = {"when": when, "scale": 2}
    assert pipeline(when) == (expected, expected, expected)


def reads_a_flow_parameter_in_each_way(name: str):
    from prefect import runtime
    from prefect.context import FlowRunContext

    seen = []
    for parameters in (FlowRunContext.get().parameters, runtime.flow_run.parameters, FlowRunContext.get().flow_run.parameters):
        try:
            seen.append(parameters[name])
        except RuntimeError as exc:
            seen.append(f"RuntimeError: {exc}")
    return seen


def test_a_flow_parameter_that_cannot_be_pickled_fails_a_body_in_an_image_with_prefect_that_reads_it(cluster, prefect_image):
    """The body read a lock's repr string as if it were the flow's value."""
    body = task(task_runner=MigTaskRunner(profile="1g.10gb", image=prefect_image))(reads_a_flow_parameter_in_each_way)

    @flow
    def pipeline(lock: Any, size: int):
        return body("size"), body("lock")

    size, lock = pipeline(threading.Lock(), 3)
    assert size == [3, 3, 3]
    assert all(e.startswith("RuntimeError: prefect.runtime.flow_run.parameters['lock']: ") for e in lock)
    assert all("_thread.lock" in e and "could not be sent" in e for e in lock)
