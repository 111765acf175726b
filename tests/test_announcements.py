"""Lease expiries and silent agents are announced once: whichever process sweeps takes each
announcement from Redis (`Allocator.reap_announced`), so two agents never emit the same event,
and a client's own sweep (a waiter) leaves them for a process that emits them."""

from __future__ import annotations

import json

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.allocator.health import sweep_announced
from prefect_mig.errors import LeaseLost

from .allocator_fixtures import H100_MIXED


def twin(alloc: Allocator) -> Allocator:
    """A second process's allocator on the same cluster and clock."""
    return Allocator(alloc.redis, alloc.keys.namespace, clock=alloc.clock)


def test_an_expired_lease_is_announced_once_with_its_slice_tenant_and_holder(one_h100, clock):
    lease = one_h100.try_acquire(SliceRequest(profile="3g.40gb", ttl_s=5, tenant="team-x", holder="flow-1/task-1"))
    other = twin(one_h100)
    clock.advance(6)
    one_h100.reap()  # a waiter's sweep makes the expiry but leaves its announcement
    first, second = one_h100.reap_announced(), other.reap_announced()
    assert second == []
    assert [a["type"] for a in first] == ["lease.expired"]
    a = first[0]
    assert (a["lease"], a["tenant"], a["holder"]) == (lease.lease_id, "team-x", "flow-1/task-1")
    assert json.loads(a["slice"])["id"] == lease.slice.id and a["held_ms"] == 6000


def test_an_expiry_made_by_a_late_renew_or_an_acquire_is_announced_too(one_h100, clock):
    a = one_h100.try_acquire(SliceRequest(profile="3g.40gb", ttl_s=5))
    b = one_h100.try_acquire(SliceRequest(profile="1g.10gb", ttl_s=5))
    clock.advance(6)
    with pytest.raises(LeaseLost):  # the renew comes too late and makes the expiry itself
        one_h100.renew(a.lease_id, a.fence, 5)
    one_h100.try_acquire(SliceRequest(profile="1g.10gb"))  # its own sweep expires b
    expired = sorted(x["lease"] for x in twin(one_h100).reap_announced() if x["type"] == "lease.expired")
    assert expired == sorted([a.lease_id, b.lease_id])


def test_a_node_whose_heartbeat_lapses_is_announced_stale_once_per_silence_with_its_age(alloc, clock):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=10)
    alloc.heartbeat("node-a", ttl_s=10)
    clock.advance(12)
    assert sweep_announced(alloc) == [("agent.stale", {"node": "node-a", "at": clock.now_ms(), "heartbeat_age_s": 12.0})]
    clock.advance(30)
    assert sweep_announced(twin(alloc)) == []  # still silent: the same episode
    assert alloc.heartbeat("node-a", ttl_s=10) == "back"
    assert alloc.heartbeat("node-a", ttl_s=10) == "ok"
    clock.advance(11)
    taken = sweep_announced(alloc)
    assert [(k, f["node"]) for k, f in taken] == [("agent.recovered", "node-a"), ("agent.stale", "node-a")]  # a new silence
    assert taken[0][1]["silent_ms"] == 30_000


def test_an_agent_that_publishes_again_after_its_node_went_silent_is_announced_recovered_once(alloc, clock):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=10)
    clock.advance(11)
    alloc.reap()  # a waiter's sweep: the announcement stays for a process that emits
    clock.advance(60)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=10)  # restarted
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=10)
    taken = sweep_announced(alloc)
    assert [k for k, _ in taken] == ["agent.stale", "agent.recovered"] and taken[1][1]["silent_ms"] == 60_000


def test_announcements_nobody_takes_are_capped_at_the_newest_thousand(one_h100, clock, redis_client):
    one_h100.reap_announced()
    for _ in range(1005):
        one_h100.try_acquire(SliceRequest(profile="3g.40gb", ttl_s=1))
        clock.advance(2)  # the next acquire expires it
    assert redis_client.llen(one_h100.keys.announce) == 1000


def test_a_sweep_takes_at_most_its_limit_oldest_first_and_leaves_the_rest(one_h100, clock, redis_client):
    leases = []
    for _ in range(3):
        leases.append(one_h100.try_acquire(SliceRequest(profile="1g.10gb", ttl_s=1)).lease_id)
        clock.advance(2)
        one_h100.reap()
    assert redis_client.llen(one_h100.keys.announce) == 3
    first, rest = one_h100.reap_announced(limit=2), one_h100.reap_announced()
    assert [a["lease"] for a in first + rest] == leases
