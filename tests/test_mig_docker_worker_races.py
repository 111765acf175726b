"""The ``mig-docker`` worker's wait for a slice against its end: the real `MigDockerWorker` runs a
flow run (in this process, against Prefect's test server, the session's redis-server and a simulated
H100) that waits for a slice; then the worker is stopped (its task cancelled, as stopping a worker
does), or the run cancelled, while the slice is handed to that very wait. Whichever wins, no lease
is left held (not even until its TTL), no request stays queued, the stop does not wait for the wait,
and a cancelled run stays cancelled: the API's disconnect race, for the worker."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from prefect_mig.allocator import SliceRequest
from prefect_mig.integrations.prefect.worker import MigDockerJobConfiguration, MigDockerWorker

from .prefect_fixtures import PREFECT_IMAGE

pytestmark = [pytest.mark.redis]

LEASE_TTL_S = 60  # a grant the worker dropped would stay held this long
WAIT_TIMEOUT_S = 90  # a wait the worker could not stop would hold up its stop this long
ROUNDS = 3  # the race goes either way: each round is a new flow run and a new worker


@flow
def waits_for_a_slice() -> None:
    """Never runs here: the worker is stopped, or the run cancelled, while the run waits."""


@asynccontextmanager
async def _a_run_waiting_on_a_worker(client, alloc, image: str = PREFECT_IMAGE):
    """A new flow run on a new real worker, in a task group as the worker's own holds its runs;
    entered once the run waits for the held 3g.40gb (it shows AwaitingMIG once the worker's wait
    has begun: its thread is started first). Yields (flow run, that task group)."""
    flow_run = await client.create_flow_run(waits_for_a_slice)
    template = MigDockerWorker.get_default_base_job_template()
    values = {"image": image, "profile": "3g.40gb", "lease_ttl_s": LEASE_TTL_S, "wait_timeout_s": WAIT_TIMEOUT_S}
    configuration = await MigDockerJobConfiguration.from_template_and_values(template, values)
    configuration.prepare_for_flow_run(flow_run)
    async with MigDockerWorker(work_pool_name=f"race-{alloc.keys.namespace}") as worker:
        async with anyio.create_task_group() as runs:
            runs.start_soon(worker.run, flow_run, configuration)
            deadline = time.monotonic() + 120
            while (await client.read_flow_run(flow_run.id)).state.name != "AwaitingMIG":
                assert time.monotonic() < deadline, "the flow run never showed AwaitingMIG"
                await anyio.sleep(0.05)
            assert len(alloc.status()["queue"]) == 1
            yield flow_run, runs


async def _stop_the_worker_while_its_run_waits(alloc, held, order: str) -> float:
    """Stop the worker of a waiting run and (unless `order` is ``stop-alone``) hand the slice to its
    wait, before or after; return how long the stop took."""
    async with get_client() as client:
        async with _a_run_waiting_on_a_worker(client, alloc) as (_, runs):
            if order == "grant-then-stop":  # the slice goes to the waiting request, the worker stops at once
                assert alloc.release(held.lease_id, held.fence)
            runs.cancel_scope.cancel()
            stopping = time.monotonic()
            if order == "stop-then-grant":  # the worker stops, the slice is handed over before its wait noticed
                assert alloc.release(held.lease_id, held.fence)
    return time.monotonic() - stopping


@pytest.mark.parametrize("order", ["grant-then-stop", "stop-then-grant", "stop-alone"])
def test_a_worker_stopped_while_its_flow_run_waits_stops_at_once_and_leaves_no_lease_whichever_wins(cluster, order):
    alloc = cluster
    for _ in range(ROUNDS if order != "stop-alone" else 1):
        held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))  # the only 3g.40gb
        stopped_in_s = asyncio.run(_stop_the_worker_while_its_run_waits(alloc, held, order))
        assert stopped_in_s < 20, f"stopping the worker took {stopped_in_s:.0f} s: it waited for the run's wait"
        if order == "stop-alone":
            assert alloc.status()["queue"] == [], "the stopped worker's request is still queued"
            assert alloc.release(held.lease_id, held.fence)
        deadline = time.monotonic() + 15  # well inside the lease's TTL: a dropped grant would still be held
        while alloc.status()["leases"] or alloc.status()["queue"]:
            assert time.monotonic() < deadline, f"left behind: {alloc.status()['leases'] or alloc.status()['queue']}"
            time.sleep(0.1)


async def _cancel_the_run_as_its_wait_is_granted(alloc, held, image: str) -> list[tuple[str, str]]:
    """A waiting run is cancelled (CANCELLING, as the UI does) and at once its slice is freed, so
    the grant reaches the worker before its cancel watch does. Returns the run's states, oldest first."""
    from prefect.states import Cancelling

    async with get_client() as client:
        async with _a_run_waiting_on_a_worker(client, alloc, image) as (flow_run, _):
            await client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            assert alloc.release(held.lease_id, held.fence)
        states = await client.read_flow_run_states(flow_run.id)
    return [(s.type.value, s.name) for s in sorted(states, key=lambda s: s.timestamp)]


def test_a_flow_run_cancelled_as_its_wait_is_granted_ends_cancelled_without_running_or_holding(cluster, python_image):
    alloc = cluster
    for _ in range(ROUNDS):
        held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))  # the only 3g.40gb
        states = asyncio.run(_cancel_the_run_as_its_wait_is_granted(alloc, held, python_image))
        after = states[[t for t, _ in states].index("CANCELLING"):]
        assert [t for t, _ in after] == ["CANCELLING", "CANCELLED"], f"the cancel was overridden: {states}"
        assert alloc.status()["leases"] == [] and alloc.status()["queue"] == []


def test_a_final_state_put_back_after_the_workers_running_message_keeps_its_result(prefect_api):
    """The worker names the slice in a Running state once the run's engine set Running; should the
    run end between its read and that write, it puts the final state back. Put back through
    `set_flow_run_state`, a Completed state read from the API lost its result (Prefect sends a
    state's data only if it is this process's result record), and the caller of an ``@mig`` flow
    got MissingResult (seen once in a loaded full-suite run)."""
    from prefect.states import Running

    @flow(persist_result=True)
    def answers() -> int:
        return 42

    flow_run_id = answers(return_state=True).state_details.flow_run_id

    async def end_overwritten_then_put_back():
        async with get_client() as client:
            final = (await client.read_flow_run(flow_run_id)).state
            await client.set_flow_run_state(flow_run_id, Running(message="running on a slice"), force=True)
            async with MigDockerWorker(work_pool_name="put-back") as worker:
                await worker._put_back(flow_run_id, final)
            again = (await client.read_flow_run(flow_run_id)).state
            return again.type.value, await again.aresult()

    assert asyncio.run(end_overwritten_then_put_back()) == ("COMPLETED", 42)


def test_flow_runs_waiting_for_slices_hold_none_of_the_workers_threads(cluster, python_image):
    """The worker waits for a slice, and for a flow run's container, in threads. On anyio's default
    limiter, which all of the worker's thread calls share (40 threads), as many waiting runs as it
    had threads held them all, and the lease release that would end a wait queued behind them:
    nothing ran until the waits timed out. Here the limiter has 2 threads and 3 runs wait for the
    one 3g.40gb; once it is freed, all three must run, one after another."""
    alloc = cluster
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))  # the only 3g.40gb

    async def three_runs_on_two_threads() -> tuple[float, list[int]]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2  # this event loop's only
        template = MigDockerWorker.get_default_base_job_template()
        values = {"image": python_image, "profile": "3g.40gb", "lease_ttl_s": LEASE_TTL_S,
                  "wait_timeout_s": WAIT_TIMEOUT_S, "command": "python3 -c pass"}
        codes: list[int] = []
        async with get_client() as client:
            runs = [await client.create_flow_run(waits_for_a_slice) for _ in range(3)]
            async with MigDockerWorker(work_pool_name=f"threads-{alloc.keys.namespace}") as worker:

                async def run(flow_run) -> None:
                    configuration = await MigDockerJobConfiguration.from_template_and_values(template, values)
                    configuration.prepare_for_flow_run(flow_run)
                    codes.append((await worker.run(flow_run, configuration)).status_code)

                async with anyio.create_task_group() as group:
                    for flow_run in runs:
                        group.start_soon(run, flow_run)
                    deadline = time.monotonic() + 120
                    while len(alloc.status()["queue"]) < 2:  # the third may still be on its way
                        assert time.monotonic() < deadline, "the runs never queued for the slice"
                        await anyio.sleep(0.1)
                    await anyio.sleep(2)
                    freed = time.monotonic()
                    assert alloc.release(held.lease_id, held.fence)
        return time.monotonic() - freed, codes

    took, codes = asyncio.run(three_runs_on_two_threads())
    assert codes == [0, 0, 0]
    assert took < WAIT_TIMEOUT_S, f"the three runs took {took:.0f} s after the slice was freed: their waits starved the releases"
    assert len([e for e in alloc.events() if e["type"] == "lease.granted" and e.get("holder") != "someone else"]) == 3
    assert alloc.status()["leases"] == [] and alloc.status()["queue"] == []
