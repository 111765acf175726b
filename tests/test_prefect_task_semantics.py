"""A task on a slice behaves like a Prefect task (issue 11): flow exits, pickling, timeouts,
exceptions, run context. Real Prefect API, real Redis, real Docker."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time

import cloudpickle
import pytest
from prefect import flow
from prefect import task as prefect_task

from prefect_mig import MigTaskRunner, task
from prefect_mig.launchers.docker import task_containers

from .prefect_fixtures import read_task_run_states


def nap_then_answer():
    import time

    time.sleep(2)
    return 42


def _task_run_state(task_run_id):
    """The task run's state as the API has it: None while the API has not recorded the run or its
    first state yet (Prefect 3 records them from events, a moment after they happen)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_task_run(task_run_id).state
        except ObjectNotFound:
            return None


@pytest.mark.parametrize("mode", ["flow-level", "task-level"])
def test_a_task_still_running_when_the_flow_returns_normally_finishes(cluster, mode):
    # ThreadPoolTaskRunner.__exit__ calls cancel_all() on every exit and lets running tasks finish.
    if mode == "flow-level":
        napper, runner = prefect_task(tags=["mig:1g.10gb"])(nap_then_answer), MigTaskRunner()
    else:
        napper, runner = task(task_runner=MigTaskRunner(profile="1g.10gb"))(nap_then_answer), None

    @flow(**({"task_runner": runner} if runner else {}))
    def pipeline():
        future = napper.submit()
        deadline = time.monotonic() + 60
        while not cluster.status()["leases"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the body is in its container when the flow returns
        return future.task_run_id

    state = pipeline(return_state=True)
    assert state.is_completed()
    task_run_id, returned = state.result(), time.monotonic()
    task_state = _task_run_state(task_run_id)
    while (task_state is None or not task_state.is_final()) and time.monotonic() < returned + 60:
        time.sleep(0.25)  # Prefect 3 records task run states from events, a moment after they happen
        task_state = _task_run_state(task_run_id)
    assert task_state is not None and task_state.is_completed(), task_state and task_state.message


def double(x):
    return 2 * x


def test_a_mig_task_pickles_after_its_first_run(cluster):
    doubler = task(task_runner=MigTaskRunner(profile="1g.10gb"))(double)

    @flow
    def pipeline():
        return doubler(21)

    assert pipeline() == 42
    clone = cloudpickle.loads(cloudpickle.dumps(doubler))

    @flow
    def again():
        return clone(4)

    assert again() == 8


async def sleep_async_30s():
    import asyncio

    await asyncio.sleep(30)


def sleep_30s():
    import time

    time.sleep(30)
    return "finished"


def _run_with_a_2s_timeout(body, mode, cluster, docker_client, namespace):
    """Run `body` as a task with ``timeout_seconds=2`` on a 3g.40gb slice, under a flow-level or a
    task-level runner: (seconds it took, its state, the cluster's status, our containers) then."""
    if mode == "flow-level":
        slow, runner = prefect_task(tags=["mig:3g.40gb"], timeout_seconds=2)(body), MigTaskRunner()
    else:
        slow, runner = task(task_runner=MigTaskRunner(profile="3g.40gb"), timeout_seconds=2)(body), None

    @flow(**({"task_runner": runner} if runner else {}))
    def pipeline():
        started = time.monotonic()
        if runner:
            future = slow.submit()
            future.wait(60)
            state = future.state
        elif inspect.iscoroutinefunction(body):
            state = asyncio.run(slow(return_state=True))
        else:
            state = slow(return_state=True)
        return time.monotonic() - started, state, cluster.status(), task_containers(
            docker_client, cluster_id=cluster.cluster_id(), namespace=namespace)

    return pipeline()


@pytest.mark.parametrize("mode", ["flow-level", "task-level"])
def test_an_async_task_timeout_stops_its_container_and_frees_the_slice_when_it_hits(cluster, docker_client, namespace, mode):
    took, state, status, containers = _run_with_a_2s_timeout(sleep_async_30s, mode, cluster, docker_client, namespace)
    assert state.is_failed() and "exceeded timeout" in state.message
    assert took < 20  # not the body's 30 s
    assert status["leases"] == [] and {s["state"] for s in status["slices"]} == {"free"}  # when the timeout hit
    assert containers == []


@pytest.mark.parametrize("mode", ["flow-level", "task-level"])
def test_a_sync_task_times_out_at_its_deadline_even_when_prefects_timeout_never_reaches_its_thread(
    cluster, docker_client, namespace, mode, monkeypatch
):
    # Prefect times out a sync task in a worker thread by raising an exception into that thread;
    # under load one landed in a urllib3 finalizer, where Python drops it, and the task Completed
    # after its whole body. Here the delivery is dropped every time: the runner's own deadline
    # must still stop the container, free the slice and end the run TimedOut.
    from prefect._internal.concurrency import cancellation

    monkeypatch.setattr(cancellation, "_send_exception_to_thread", lambda thread, exc_type: None)
    took, state, status, containers = _run_with_a_2s_timeout(sleep_30s, mode, cluster, docker_client, namespace)
    assert state.name == "TimedOut" and "exceeded timeout of 2" in state.message, (state.name, state.message)
    assert took < 20  # not the body's 30 s
    assert status["leases"] == [] and {s["state"] for s in status["slices"]} == {"free"}
    assert containers == []  # gone when the timeout hit, not only by the fixture's teardown


def gpu_env(i):
    import os

    return i, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_call_time_tags_and_direct_calls_under_a_flow_level_runner_run_on_a_slice(cluster):
    from prefect import tags

    untagged = prefect_task(gpu_env)
    tagged = prefect_task(tags=["mig:1g.10gb"])(gpu_env)

    @flow(task_runner=MigTaskRunner())
    def pipeline():
        with tags("mig:1g.10gb"):
            submitted = untagged.submit(1).result()
            called = untagged(2)
        return submitted, called, tagged(3), untagged(4)

    submitted, called, direct, host = pipeline()
    for i, uuid in (submitted, called, direct):
        assert uuid is not None and uuid.startswith("MIG-"), (i, uuid)
    assert host == (4, os.environ.get("CUDA_VISIBLE_DEVICES"))  # no mig: tag: the host, as before
    assert len([e for e in cluster.events() if e["type"] == "lease.granted"]) == 3


def _state_names(task_run_id):
    states = read_task_run_states(task_run_id, until=lambda states: states and states[-1].name == "Completed")
    return [s.name for s in states]


def test_a_try_on_a_slice_has_the_state_history_of_a_thread_pool_task(cluster, caplog):
    on_slice = task(task_runner=MigTaskRunner(profile="1g.10gb"))(double)
    on_host = prefect_task(double)

    @flow
    def pipeline():
        futures = on_slice.submit(1), on_host.submit(1)
        for f in futures:
            f.wait()  # else a task not yet started when the flow returns is cancelled (Crashed), as in Prefect
        return tuple(f.task_run_id for f in futures)

    slice_run, host_run = pipeline()
    assert _state_names(slice_run) == _state_names(host_run) == ["Pending", "Running", "Completed"]
    assert any("leased 1g.10gb@" in r.getMessage() for r in caplog.records)  # the slice is in the logs


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: MigTaskRunner(profile="5g.1gb"), "profile"),
        (lambda: MigTaskRunner(profile=">=500gb"), "profile"),
        (lambda: task(task_runner=MigTaskRunner(profile="1g.10gb"), tags=["mig:9g.99gb"])(double), "tags"),
    ],
    ids=["unknown-profile", "unsatisfiable-minimum", "unknown-profile-tag"],
)
def test_a_profile_no_known_gpu_model_offers_fails_at_decoration_time(make, field):
    from prefect_mig.errors import ConfigError

    with pytest.raises(ConfigError, match="no GPU model prefect-mig knows") as caught:
        make()
    assert caught.value.field == field and "1g.10gb" in str(caught.value)  # says what is allowed


def test_the_known_profiles_an_unknown_one_is_told_are_in_size_order():
    """Found by a new-user trial: the list ran 1g.10gb ... 1g.47gb, 1g.5gb, 1g.67gb, 1g.6gb (text order)."""
    from prefect_mig.errors import ConfigError
    from prefect_mig.model.profiles import parse_profile_name

    with pytest.raises(ConfigError) as caught:
        MigTaskRunner(profile="1g.11gb")
    listed = str(caught.value).split("Profiles of the known models: ")[1].rstrip(".").split(", ")
    sizes = [(p.compute_slices, p.memory_gb) for p in map(parse_profile_name, listed)]
    assert sizes == sorted(sizes) and listed[0] == "1g.5gb", listed


def body_using_prefect(n):
    from prefect import get_run_logger
    from prefect.runtime import flow_run, task_run

    logger = get_run_logger()
    logger.warning("careful with %s", n)
    logger.error("details %s", n)
    try:
        from prefect import task  # not in the stand-in

        refused = f"imported {task}"
    except ImportError as exc:
        refused = str(exc)
    return task_run.name, task_run.run_count, task_run.parameters, flow_run.name, flow_run.flow_name, refused


def test_a_body_in_an_image_without_prefect_gets_run_values_and_a_logger_that_keeps_levels(cluster, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    uses_prefect = task(task_runner=MigTaskRunner(profile="1g.10gb"), retries=1)(body_using_prefect)

    @flow(name="shim-check")
    def pipeline():
        from prefect.runtime import flow_run

        return uses_prefect(5), flow_run.name

    (name, run_count, parameters, flow_name, flow_fn_name, refused), expected_flow_name = pipeline()
    assert name.startswith("body_using_prefect") and run_count == 1 and parameters == {"n": 5}
    assert (flow_name, flow_fn_name) == (expected_flow_name, "shim-check")
    assert "use an image with Prefect" in refused
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "prefect.task_runs"}
    assert levels.get("careful with 5") == logging.WARNING and levels.get("details 5") == logging.ERROR


def sleep_two_minutes():
    import time

    time.sleep(120)


def test_an_explicit_cancel_all_on_a_flow_level_runner_stops_its_container_and_frees_the_slice(cluster):
    from prefect.context import FlowRunContext

    slow = prefect_task(tags=["mig:1g.10gb"])(sleep_two_minutes)
    took: list[float] = []

    @flow(task_runner=MigTaskRunner())
    def pipeline():
        future = slow.submit()
        deadline = time.monotonic() + 60
        while not cluster.status()["leases"] and time.monotonic() < deadline:
            time.sleep(0.1)
        started = time.monotonic()
        FlowRunContext.get().task_runner.cancel_all()  # not from __exit__: a cancellation
        future.wait(60)
        took.append(time.monotonic() - started)
        return future.state

    state = pipeline(return_state=True)
    task_state = state.result(raise_on_failure=False)
    assert took and took[0] < 30  # stopped promptly, not after the body's 120 s
    assert task_state.is_cancelled() and "the flow run was cancelled" in task_state.message
    assert cluster.status()["leases"] == []


def test_a_timeout_raised_into_the_thread_mid_acquire_neither_stops_it_halfway_nor_keeps_what_it_got():
    # Prefect's sync timeouts raise into the task's thread wherever it is (PyThreadState_SetAsyncExc):
    # the slice's grant and its release must not be cut in half by it.
    import ctypes
    import threading

    from prefect_mig.integrations.prefect.context import shielded

    started, finished, undone, outcome = threading.Event(), threading.Event(), [], []

    def grant():
        started.set()
        time.sleep(0.5)  # the "Redis round trip" the timeout lands in
        finished.set()
        return "lease"

    def try_():
        try:
            shielded(grant, undo=undone.append)
        except TimeoutError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=try_)
    worker.start()
    assert started.wait(10)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(TimeoutError))
    worker.join(10)
    assert finished.is_set() and undone == ["lease"]  # it ran to its end, then what it got was given back
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)  # and the timeout still raised


def test_a_timeout_landing_while_shielded_makes_its_helper_thread_still_runs_the_call():
    """The cleanup in the runner's ``finally`` (release the lease, stop the warm container) runs
    through `shielded`: a sync task's timeout that lands while `shielded` is still making its
    helper thread (Thread.__init__ is many bytecodes) must not skip the call. A trace function
    raises it at exactly that point."""
    import sys
    import threading

    from prefect_mig.integrations.prefect.context import shielded

    ran, fired, outcome = [], [], []

    def trace(frame, event, arg):
        if event == "call" and frame.f_code is threading.Thread.__init__.__code__ and not fired:
            fired.append(True)
            raise TimeoutError("the task's timeout, landing as shielded makes its helper thread")
        return None

    def try_() -> None:
        sys.settrace(trace)
        try:
            shielded(ran.append, "released")
        except TimeoutError as exc:
            outcome.append(exc)
        finally:
            sys.settrace(None)

    worker = threading.Thread(target=try_, daemon=True)
    worker.start()
    worker.join(10)
    assert fired and ran == ["released"]  # the call still ran, once
    assert len(outcome) == 1  # and the timeout still raised


def answer():
    return 42


@pytest.mark.parametrize("when", ["as the grant is handed back", "at the first call after a granted wait"])
def test_a_timeout_landing_right_after_the_grant_leaves_no_lease_held(redis_server, namespace, monkeypatch, python_image, when):
    """Prefect's sync timeout lands in the task's thread at any function call or return. Landing
    just after the slice was granted, before the runner's release is armed, it used to leave the
    grant held until its TTL (seen once as a leaked lease after the timeout tests). A trace function
    raises it at exactly such a point here: as `shielded` hands the grant back (the few bytecodes
    after its wait), or at the first call after a wait for a slice was granted."""
    import sys
    import threading

    import redis

    from prefect_mig.allocator import Allocator, Lease, LeaseInfo, SliceRequest
    from prefect_mig.integrations.prefect.context import shielded

    from .allocator_fixtures import H100_MIXED

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    monkeypatch.setenv("PREFECT_MIG_BACKEND", "simulated")
    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})  # one 3g.40gb
    blocker = alloc.try_acquire(SliceRequest(profile="3g.40gb", ttl_s=600)) if "wait" in when else None
    fired, outcome = [], []

    def land() -> None:
        fired.append(True)
        raise TimeoutError("the task's timeout, landing right after the grant")

    def handed_back(frame, event, arg):  # the local trace of `shielded`: its return of a grant
        if event == "return" and isinstance(arg, (Lease, LeaseInfo)) and not fired:
            land()
        return handed_back

    granted: list = []

    def grant_returned(frame, event, arg):  # the local trace of `wait_for_grant`: a grant returned
        if event == "return" and isinstance(arg, LeaseInfo):
            granted.append(arg)
        return grant_returned

    def trace(frame, event, arg):
        if event != "call":
            return None
        if when == "as the grant is handed back":
            return handed_back if frame.f_code is shielded.__code__ else None
        if granted and not fired:
            land()  # the first call of any function once the grant is back in the task's thread
        return grant_returned if frame.f_code is Allocator.wait_for_grant.__code__ else None

    def try_() -> None:
        sys.settrace(trace)
        try:
            MigTaskRunner(profile="3g.40gb", image=python_image).run_in_slice(answer, (), {})
        except BaseException as exc:  # noqa: BLE001 - the test looks at what the try raised
            outcome.append(exc)
        finally:
            sys.settrace(None)

    worker = threading.Thread(target=try_, daemon=True)
    worker.start()
    if blocker is not None:
        deadline = time.monotonic() + 60
        while not alloc.status()["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alloc.status()["queue"], "the try did not queue for the slice"
        alloc.release(blocker.lease_id, blocker.fence)
    worker.join(60)
    assert fired and len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert alloc.status()["leases"] == [], "the grant was left held after the timeout landed"
    assert alloc.status()["queue"] == []


def test_a_timeout_landing_as_a_warm_slot_is_taken_leaves_no_lease_held(cluster):
    """The warm form of the test above: a timeout landing as `shielded` hands back a warm slot
    taken for this try used to lose the slot, its lease renewed and held on (the flow run's end
    closes only idle slots). The runner's code runs in a thread of its own (`run_in_slice_sync`),
    which Prefect's timeout no longer reaches; the trace raises there all the same."""
    import sys

    from prefect_mig.integrations.prefect.context import shielded
    from prefect_mig.launchers.warm_pool import WarmSlot

    fired = []

    def handed_back(frame, event, arg):
        if event == "return" and isinstance(arg, WarmSlot) and not fired:
            fired.append(True)
            raise TimeoutError("the task's timeout, landing as the warm slot is handed back")
        return handed_back

    def trace(frame, event, arg):
        return handed_back if event == "call" and frame.f_code is shielded.__code__ else None

    warm_answer = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=600))(answer)

    @flow
    def pipeline():
        first = warm_answer(return_state=True)  # cold; its slot is parked warm
        sys.settrace(trace)
        threading.settrace(trace)  # the try's own thread, started by this call
        try:
            second = warm_answer(return_state=True)  # takes that slot
        finally:
            threading.settrace(None)
            sys.settrace(None)
        return first, second

    first, second = pipeline()
    assert first.is_completed() and fired and second.is_failed(), second
    deadline = time.monotonic() + 30
    while cluster.status()["leases"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.status()["leases"] == [], "the taken warm slot's lease was left held"


# Differences from ThreadPoolTaskRunner that the README lists, each a decision tested here.


def prints_and_returns(n: int) -> int:
    print(f"printed by the body {n}")
    return n


def test_a_bodys_output_lines_go_to_the_task_runs_logs_without_log_prints(cluster, caplog):
    # In a thread a print() reaches the run's logs only with log_prints=True; a container's output
    # always goes there (at INFO), since it has no other place to go.
    import logging

    caplog.set_level(logging.INFO)
    body = task(task_runner=MigTaskRunner(profile="1g.10gb"))(prints_and_returns)

    @flow
    def pipeline():
        return body(7)

    assert pipeline() == 7
    lines = [r for r in caplog.records if r.name == "prefect.task_runs" and r.getMessage() == "printed by the body 7"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


def test_what_a_body_changes_in_its_closure_or_environment_does_not_come_back(cluster, monkeypatch):
    # Arguments and results cross a process boundary with cloudpickle: the body works on copies.
    monkeypatch.setenv("ONLY_IN_THE_FLOWS_PROCESS", "1")
    seen: list[int] = []

    def appends() -> tuple[list[int], str | None]:
        import os

        seen.append(1)
        return seen, os.environ.get("ONLY_IN_THE_FLOWS_PROCESS")

    body = task(task_runner=MigTaskRunner(profile="1g.10gb"))(appends)

    @flow
    def pipeline():
        return body()

    returned, env_value = pipeline()
    assert returned == [1] and seen == [], "the body's copy changed, the flow's list did not"
    assert env_value is None, "the flow's environment is not the container's (use MigTaskRunner(env=...))"


def returns_a_lock():
    import threading

    return threading.Lock()


def test_a_return_value_that_cannot_be_pickled_fails_the_task_saying_so(cluster):
    body = task(task_runner=MigTaskRunner(profile="1g.10gb"))(returns_a_lock)

    @flow
    def pipeline():
        return body()

    with pytest.raises(Exception, match="return value cannot be pickled"):
        pipeline()


def uses_its_lock(batch, lock):
    with lock:
        return batch


@pytest.mark.parametrize("keep_warm_s", [0, 30], ids=["cold", "warm"])
def test_an_argument_that_cannot_be_pickled_fails_the_task_naming_it_before_any_slice_is_leased(cluster, keep_warm_s):
    """A new-user trial: a lock passed to a task on a slice failed only once a slice was leased
    (after a wait for it, on a busy cluster), with a bare "cannot pickle '_thread.lock' object"
    that named neither the argument nor why it must pickle."""
    import threading

    from prefect_mig.errors import ConfigError

    body = task(task_runner=MigTaskRunner(profile="1g.10gb", keep_warm_s=keep_warm_s))(uses_its_lock)

    @flow
    def pipeline():
        return body([1, 2], threading.Lock())

    with pytest.raises(ConfigError, match=r"argument 'lock' of uses_its_lock \(a _thread\.lock\) cannot be sent") as raised:
        pipeline()
    assert raised.value.field == "lock"
    assert "cannot pickle '_thread.lock' object" in str(raised.value)
    assert [e for e in cluster.events() if e["type"] == "lease.granted"] == []
    assert cluster.status()["leases"] == []


def test_a_task_that_starts_while_its_flow_run_is_failing_runs_its_body(cluster):
    """When a flow's code raises (a `.result()` of a failed task), Prefect puts the exception in the
    flow run's state while tasks already submitted still start; their bodies must still run (seen
    as PydanticSerializationError on every later task of a 100-task map)."""
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    doubler = task(task_runner=MigTaskRunner(profile="1g.10gb"))(double)

    @flow
    def pipeline():
        run = FlowRunContext.get().flow_run
        run.state = Failed(message="a task failed", data=RuntimeError("the flow's code raised"))
        return doubler(21)

    assert pipeline() == 42


def yields_batches(n):
    yield from range(n)


async def yields_batches_async(n):
    for i in range(n):
        yield i


@pytest.mark.parametrize("body", [yields_batches, yields_batches_async], ids=["generator", "async-generator"])
def test_a_generator_task_on_a_slice_is_refused_at_decoration_time_saying_to_return_a_list(body):
    """A new-user trial: a ``yield``ing task on a slice failed only when it ran, with "the task body
    raised an unpicklable return value: cannot pickle 'generator' object" (its body runs in a
    container, so its values can come back only once it has ended)."""
    from prefect_mig.errors import ConfigError

    with pytest.raises(ConfigError, match="generator") as caught:
        task(task_runner=MigTaskRunner(profile="1g.10gb"))(body)
    assert caught.value.field == "fn" and "return a list" in str(caught.value)


def test_a_mig_tagged_generator_task_under_a_flow_level_runner_is_refused_leasing_nothing(cluster):
    from prefect_mig.errors import ConfigError

    gen = prefect_task(tags=["mig:1g.10gb"])(yields_batches)

    @flow(task_runner=MigTaskRunner())
    def pipeline():
        with pytest.raises(ConfigError, match="generator"):
            gen.submit(3)
        with pytest.raises(ConfigError, match="generator"):
            list(gen(3))
        return "refused"

    assert pipeline() == "refused"
    status = cluster.status()
    assert status["leases"] == [] and status["queue"] == []


class _Quiet(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        pass


class _LockHeldWhenLeased(logging.Filter):
    """Makes the task's thread wait for this handler's lock as its runner logs "leased ...": a
    helper thread takes the lock first and keeps it past the task's timeout, as another thread's
    slow log write (a console on a loaded machine, a full queue) would."""

    def __init__(self, handler: logging.Handler, hold_s: float) -> None:
        super().__init__()
        self.handler, self.hold_s = handler, hold_s
        self.held = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("leased ") and not self.held.is_set():
            threading.Thread(target=self._hold, daemon=True).start()
            self.held.wait(10)
        return True

    def _hold(self) -> None:
        with self.handler.lock:
            self.held.set()
            time.sleep(self.hold_s)


@pytest.mark.parametrize("mode", ["flow-level", "task-level"])
def test_a_sync_task_timeout_that_lands_while_its_runner_logs_leaves_no_logging_lock_held(
    cluster, docker_client, namespace, mode
):
    # Prefect times out a sync task in a worker thread by raising an exception into that thread at
    # its next bytecode. Landing just after a logging handler took its lock (before the `try` that
    # releases it), it left the lock held by a thread that had moved on: the next log line from any
    # other thread through that handler waited forever (a whole CI run hung in the timeout tests).
    # The runner's code must not take such an exception: its own deadline ends the try instead.
    handler = _Quiet()
    handler.addFilter(_LockHeldWhenLeased(handler, hold_s=3.0))
    task_logger = logging.getLogger("prefect.task_runs")
    if mode == "flow-level":
        slow, runner = prefect_task(tags=["mig:1g.10gb"], timeout_seconds=1)(sleep_30s), MigTaskRunner()
    else:  # submitted to Prefect's ThreadPoolTaskRunner: its timeout is raised into a pool thread
        slow, runner = task(task_runner=MigTaskRunner(profile="1g.10gb"), timeout_seconds=1)(sleep_30s), None

    @flow(**({"task_runner": runner} if runner else {}))
    def pipeline():
        future = slow.submit()
        future.wait(60)
        return future.state.name, future.state.message  # not the state: a failed one fails the flow

    task_logger.addHandler(handler)
    try:
        name, message = pipeline()
        free = handler.lock.acquire(timeout=10)
        if free:
            handler.lock.release()
    finally:
        task_logger.removeHandler(handler)
    assert free, "a logging handler's lock is still held by the timed-out task's thread"
    assert name == "TimedOut", (name, message)
    assert cluster.status()["leases"] == []
    assert task_containers(docker_client, cluster_id=cluster.cluster_id(), namespace=namespace) == []


async def nap_async(i: int) -> int:
    import asyncio

    await asyncio.sleep(5)  # long enough for all three to be granted before the first ends
    return i


def test_async_tasks_gathered_in_an_async_flow_all_run_at_once_past_the_loops_thread_limit(cluster):
    """Each try of an async task waits for its slice and its container in a thread. On the event
    loop's default limiter (40 threads, also Prefect's) `asyncio.gather` of more tries than that ran
    only 40 at a time, and left none for anything else. Here the loop's limiter has 2 threads and 3
    tasks on three free slices must all hold their slices at once."""
    import anyio

    napper = task(task_runner=MigTaskRunner(profile="1g.10gb"))(nap_async)

    @flow
    async def pipeline():
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2  # this flow's event loop only
        with anyio.fail_after(240):  # fails, not hangs, should the tries wait for threads
            return await asyncio.gather(*(napper(i) for i in range(3)))

    assert asyncio.run(pipeline()) == [0, 1, 2]
    held, most = 0, 0
    for event in cluster.events():
        held += {"lease.granted": 1, "lease.released": -1}.get(event["type"], 0)
        most = max(most, held)
    assert most == 3, f"at most {most} of the 3 tasks held a slice at once"
