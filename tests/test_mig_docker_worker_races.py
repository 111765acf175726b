"""The ``mig-docker`` worker's wait for a slice against its end: the real `MigDockerWorker` runs a
flow run (in this process, against Prefect's test server, the session's redis-server and a simulated
H100) that waits for a slice; then the worker is stopped (its task cancelled, as stopping a worker
does) while the slice is handed to that very wait. Whichever wins, no lease is left held (not even
until its TTL) and no request stays queued: the API's disconnect race, for the worker."""

from __future__ import annotations

import asyncio
import time

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
    """Never runs here: the worker is stopped while the run waits."""


async def _stop_the_worker_while_its_run_waits(alloc, held, order: str) -> float:
    """Run a flow run on a real worker until it waits for the held slice, then stop the worker and
    (unless `order` is ``stop-alone``) hand the slice to the wait; return how long the stop took."""
    pool = f"race-{alloc.keys.namespace}"
    async with get_client() as client:
        flow_run = await client.create_flow_run(waits_for_a_slice)
    template = MigDockerWorker.get_default_base_job_template()
    values = {"image": PREFECT_IMAGE, "profile": "3g.40gb", "lease_ttl_s": LEASE_TTL_S, "wait_timeout_s": WAIT_TIMEOUT_S}
    configuration = await MigDockerJobConfiguration.from_template_and_values(template, values)
    configuration.prepare_for_flow_run(flow_run)
    async with MigDockerWorker(work_pool_name=pool) as worker:
        async with anyio.create_task_group() as runs:  # as the worker's own task group holds its runs
            runs.start_soon(worker.run, flow_run, configuration)
            # AwaitingMIG is set once the worker's wait has begun (its thread is started first)
            deadline = time.monotonic() + 120
            async with get_client() as client:
                while (await client.read_flow_run(flow_run.id)).state.name != "AwaitingMIG":
                    assert time.monotonic() < deadline, "the flow run never showed AwaitingMIG"
                    await anyio.sleep(0.05)
            assert len(alloc.status()["queue"]) == 1
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
