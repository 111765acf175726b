"""Warm leases in the allocator (warm.lua, warmth.py): warmth never blocks anyone."""

from __future__ import annotations

import threading

from prefect_mig.allocator import Allocator, Lease, LeaseClient, Quota, SliceRequest
from prefect_mig.allocator.allocator import Queued
from prefect_mig.allocator.invariants import check_events
from prefect_mig.allocator.warmth import HANDOVER_NOTICE, park, take
from prefect_mig.repartition.service import gpu_states

SEVEN_1G = " + ".join(f"1g.10gb@{i}" for i in range(7))


def _one_1g(alloc: Allocator) -> None:
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["3g.40gb@0 + 1g.10gb@4"]})


def _warm_1g(alloc: Allocator, **request):
    """A lease on the one 1g slice, kept warm."""
    _one_1g(alloc)
    held = alloc.try_acquire(SliceRequest(profile="1g.10gb", **request))
    assert park(alloc, held.lease_id, held.fence) == ("warm", None)
    return held


def _released_to(alloc: Allocator, held, request_id: str) -> bool:
    """Release `held`; whether its slice went to `request_id`."""
    alloc.release(held.lease_id, held.fence)
    return alloc.lease(request_id).slice.id == held.slice.id


def test_a_lease_nobody_else_waits_for_is_kept_warm_and_taken_back(alloc):
    _one_1g(alloc)
    held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
    assert park(alloc, held.lease_id, held.fence) == ("warm", None)
    assert take(alloc, held.lease_id, held.fence) is True
    assert park(alloc, held.lease_id, held.fence) == ("warm", None)
    assert take(alloc, held.lease_id, held.fence + 1) is False  # a stale token takes nothing
    check_events(alloc.events())


def test_a_lease_another_request_waits_for_is_not_kept_warm(alloc):
    _one_1g(alloc)
    held = alloc.try_acquire(SliceRequest(profile="1g.10gb", holder="run-1"))
    waiting = alloc.try_acquire(SliceRequest(profile="1g.10gb", holder="run-2"), wait=True)
    assert isinstance(waiting, Queued)
    assert park(alloc, held.lease_id, held.fence) == ("handover", None)
    assert take(alloc, held.lease_id, held.fence) is False  # asked back: never reused
    assert _released_to(alloc, held, waiting.request_id)


def test_a_warm_lease_is_asked_back_when_a_request_queues_for_its_kind(alloc):
    held = _warm_1g(alloc)
    other = alloc.try_acquire(SliceRequest(profile="3g.40gb"), wait=True)  # a free 3g: no ask
    assert other.slice.profile == "3g.40gb"
    assert alloc.redis.lpop(alloc.keys.notice(held.lease_id)) is None
    waiting = alloc.try_acquire(SliceRequest(min_memory_gb=10, priority=0), wait=True)
    assert isinstance(waiting, Queued)
    notice = alloc.redis.lpop(alloc.keys.notice(held.lease_id))
    assert notice is not None and notice.decode() == HANDOVER_NOTICE
    assert take(alloc, held.lease_id, held.fence) is False
    assert [e["type"] for e in alloc.events()].count("lease.handover") == 1


def test_a_warm_lease_is_asked_back_before_a_preemptible_lease_is_revoked(alloc):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["1g.10gb@4 + 1g.10gb@5"]})
    victim = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=1, preemptible=True))
    warm = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=1))
    park(alloc, warm.lease_id, warm.fence)
    alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=50), wait=True)
    assert alloc.lease(victim.lease_id).revoked is False
    assert alloc.redis.lpop(alloc.keys.notice(warm.lease_id)).decode() == HANDOVER_NOTICE


def test_a_holders_own_queued_request_gets_its_warm_process_when_it_is_the_best_waiter(alloc):
    _one_1g(alloc)
    held = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=5))
    own = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=5), wait=True)
    assert park(alloc, held.lease_id, held.fence, [own.request_id]) == ("pass", own.request_id)
    assert alloc.status()["queue"] == []
    # a better waiter of someone else comes first: the slice goes back to the allocator
    mine = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=5), wait=True)
    theirs = alloc.try_acquire(SliceRequest(profile="1g.10gb", priority=9), wait=True)
    assert park(alloc, held.lease_id, held.fence, [mine.request_id]) == ("handover", None)
    assert _released_to(alloc, held, theirs.request_id)


def test_a_re_carve_of_a_warm_slice_asks_its_holder_to_hand_it_over(alloc):
    held = _warm_1g(alloc)
    assert alloc.withdraw_when_idle([held.slice.id]) == 1
    assert alloc.redis.lpop(alloc.keys.notice(held.lease_id)).decode() == HANDOVER_NOTICE


def test_draining_a_gpu_asks_its_warm_leases_to_hand_over(alloc):
    held = _warm_1g(alloc)
    assert alloc.drain(held.slice.gpu_uuid) == 1
    assert alloc.redis.lpop(alloc.keys.notice(held.lease_id)).decode() == HANDOVER_NOTICE


def test_draining_a_node_for_maintenance_asks_its_warm_leases_to_hand_over_and_keeps_none_warm(alloc):
    """`prefect-mig node drain` idles the node: a warm slot there takes no next task (its runner
    stops it and releases the lease), and a lease parked after the drain is not kept warm."""
    from prefect_mig.allocator.maintenance import drain_node

    held = _warm_1g(alloc)
    busy = alloc.try_acquire(SliceRequest(profile="3g.40gb"))  # parks only after the drain
    drain_node(alloc, "node-a", wait_s=0)
    assert alloc.redis.lpop(alloc.keys.notice(held.lease_id)).decode() == HANDOVER_NOTICE
    assert take(alloc, held.lease_id, held.fence) is False
    assert park(alloc, busy.lease_id, busy.fence) == ("handover", None)
    for lease in (held, busy):
        alloc.release(lease.lease_id, lease.fence)


def test_warm_leases_count_against_the_quota_and_end_like_any_lease(alloc):
    alloc.set_quota("team", Quota(slices=1))
    held = _warm_1g(alloc, tenant="team")
    queued = alloc.try_acquire(SliceRequest(profile="3g.40gb", tenant="team"), wait=True)
    assert isinstance(queued, Queued)  # the warm 1g is still the team's slice
    alloc.cancel(queued.request_id)
    alloc.release(held.lease_id, held.fence)
    assert alloc.redis.zcard(alloc.keys.warm(held.slice.pkey)) == 0
    check_events(alloc.events())


def test_the_planner_does_not_count_a_warm_slice_busy(alloc):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [SEVEN_1G]})
    held = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
    busy = alloc.try_acquire(SliceRequest(profile="1g.10gb"))
    park(alloc, held.lease_id, held.fence)
    (state,) = gpu_states(alloc.status())
    assert {(p.profile, p.start) for p in state.busy} == {(busy.slice.profile, busy.slice.start)}


def test_a_lease_passes_a_handover_push_to_its_holder_and_keeps_renewing(redis_server, namespace):
    client = LeaseClient(redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["1g.10gb@4"]})
    told = threading.Event()
    info = client.allocator.try_acquire(SliceRequest(profile="1g.10gb", ttl_s=30))
    lease = Lease(client.allocator, info, on_notice=lambda held, text: told.set()).start_renewing()
    try:
        park(client.allocator, lease.lease_id, lease.fence)
        client.allocator.try_acquire(SliceRequest(profile="1g.10gb"), wait=True)
        assert told.wait(10)
        assert not lease.lost.is_set()
    finally:
        lease.release()
