"""Findings 2 and 3: a revocation is pushed to the victim at once, never lengthens its lease, is not
made for a request its quota would refuse, is undone when the request leaves the queue first, and the
slice goes to the requester only after the victim stopped (or its lease truly expired)."""

from __future__ import annotations

import time

import pytest

from prefect_mig.allocator import Allocator, LeaseClient, Quota, SliceRequest
from prefect_mig.errors import ConfigError, LeaseLost
from prefect_mig.testing.holder_log import HolderLog

from .helpers import FLEET, ONE_SLICE, Holder

VICTIM = SliceRequest(profile="4g.24gb", priority=1, preemptible=True, ttl_s=60)
URGENT = SliceRequest(profile="4g.24gb", priority=9, tenant="urgent", ttl_s=60)


@pytest.fixture
def client(redis_server, namespace):
    c = LeaseClient(redis_server.url, namespace)
    c.allocator.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    c.allocator.configure_cluster(grace_s=10)
    return c


def test_the_victim_is_told_at_once_and_stops_before_the_requester_gets_the_slice(client):
    log = HolderLog()
    victim = Holder(client, log, VICTIM)
    asked = time.monotonic()
    queued = client.allocator.try_acquire(URGENT, wait=True)
    assert victim.lost.wait(5)
    told_after = time.monotonic() - asked
    assert told_after < 2.0, f"the victim learned {told_after:.1f} s after the revocation (at its next renewal?)"
    assert "revoked for a priority-9 request" in str(victim.error)
    victim.stop()  # the holder stops its work, then releases
    got = client.allocator.wait_for_grant(queued.request_id, 10, request=URGENT)
    log.add(got.slice.id, got.fence, time.time(), time.time() + 1)
    assert log.overlaps() == []


def test_a_revocation_never_lengthens_a_dead_holders_lease(client):
    dead = client.allocator.try_acquire(VICTIM.model_copy(update={"ttl_s": 2}))  # nobody renews it
    started = time.monotonic()
    got = client.allocator.acquire(URGENT, timeout_s=15)
    assert got.slice.id == dead.slice.id
    assert time.monotonic() - started < 5, "the revoked lease outlived its own TTL of 2 s"


def test_a_request_whose_quota_refuses_the_slice_revokes_nobody(client):
    client.allocator.set_quota("urgent", Quota(slices=0))
    victim = client.allocator.try_acquire(VICTIM)
    client.allocator.try_acquire(URGENT, wait=True)
    assert client.allocator.renew(victim.lease_id, victim.fence, 60) > 0


def test_a_request_that_leaves_the_queue_undoes_its_revocation(client):
    victim = client.allocator.try_acquire(VICTIM)
    queued = client.allocator.try_acquire(URGENT, wait=True)
    assert client.allocator.lease(victim.lease_id).revoked
    assert client.allocator.cancel(queued.request_id) == "cancelled"
    assert client.allocator.renew(victim.lease_id, victim.fence, 60) > 0
    assert not client.allocator.lease(victim.lease_id).revoked


def test_the_grace_is_the_clusters_not_the_requesters(client, redis_server):
    requester = Allocator(redis_server.client(), client.allocator.keys.namespace, grace_s=0)
    victim = client.allocator.try_acquire(VICTIM)
    requester.try_acquire(URGENT, wait=True)
    with pytest.raises(LeaseLost, match="within 10 s"):
        client.allocator.renew(victim.lease_id, victim.fence, 60)
    with pytest.raises(ConfigError, match="grace_s"):
        client.allocator.configure_cluster(grace_s=0)
