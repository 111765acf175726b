"""The repartitioning service plans when the allocator's events call for it (a lease ended, a
request queued), not only on its interval: a freed GPU range is re-carved for a waiting request
within seconds although the interval is ten minutes."""

from __future__ import annotations

import threading
import time

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.repartition.service import serve
from prefect_mig.repartition.trigger import Trigger

SEVEN_1G = " + ".join(f"1g.10gb@{i}" for i in range(7))


def wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := predicate()):
            return got
        time.sleep(0.1)
    return predicate()


def test_a_release_that_frees_a_range_gets_the_waiting_kind_desired_within_seconds(redis_client, namespace):
    alloc = Allocator(redis_client, namespace)  # real time: the service runs in real time
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [SEVEN_1G]})
    leases = [alloc.try_acquire(SliceRequest(profile="1g.10gb")) for _ in range(7)]
    gpu = alloc.gpus()[0]["uuid"]
    rounds: list[float] = []
    seen: list[str | None] = []  # "waiting", then what woke it, for each of the service's waits between rounds

    class SeenTrigger(Trigger):
        def wait(self, timeout_s, stop=None):
            seen.append("waiting")
            seen.append(got := super().wait(timeout_s, stop))
            return got

    stop = threading.Event()
    trigger = SeenTrigger(alloc, debounce_s=0.2)
    service = threading.Thread(
        target=serve, args=(alloc,), daemon=True,
        kwargs={"interval_s": 600, "stop": stop, "trigger": trigger, "on_plan": lambda p: rounds.append(time.monotonic())},
    )
    service.start()
    try:
        assert wait_for(alloc.repartitioner_running, timeout_s=30)  # so a kind nobody carves may wait
        alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True, wait_s=600)
        # the round this queueing triggers (done once the service waits again): nothing is idle,
        # nothing is desired; a fixed 1.5 s could end before that round on a loaded machine
        assert wait_for(lambda: "waiting" in seen[seen.index("lease.queued"):] if "lease.queued" in seen else False,
                        timeout_s=30), seen
        assert alloc.redis.hget(alloc.keys.desired, gpu) is None
        for lease in leases:
            if lease.slice.start >= 4:
                alloc.release(lease.lease_id, lease.fence)
        released = time.monotonic()
        desired = wait_for(lambda: alloc.redis.hget(alloc.keys.desired, gpu), timeout_s=30)
        assert desired is not None and b"3g.40gb@4" in desired
        assert rounds and rounds[0] - released < 30  # not the 600 s interval
    finally:
        stop.set()
        service.join(timeout=10)
    assert not service.is_alive()
    for lease in leases:
        alloc.release(lease.lease_id, lease.fence)


def test_a_burst_of_events_makes_one_round_and_a_quiet_cluster_none(redis_client, namespace):
    alloc = Allocator(redis_client, namespace)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3"]})
    trigger = Trigger(alloc, debounce_s=1.0)
    assert trigger.wait(0.3) is None
    leases = [alloc.try_acquire(SliceRequest(profile="1g.6gb")) for _ in range(4)]
    assert trigger.wait(0.3) is None  # grants change nothing the planner would do
    for lease in leases:
        alloc.release(lease.lease_id, lease.fence)
    assert trigger.wait(5) == "lease.released"
    assert trigger.wait(0.3) is None  # the burst's other releases were gathered into that one
    trigger.poke("prefect.flow-run.Completed")
    assert trigger.wait(5) == "prefect.flow-run.Completed"
