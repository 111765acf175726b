"""Finding 4: Redis comes back empty (FLUSHALL, a new server without AOF). The cluster starts a new
epoch (a ``cluster.epoch`` event opens the new stream), and a node that published before the wipe
keeps its idle slices out of service until every holder from before has had to stop."""

from __future__ import annotations

import time

import pytest

from prefect_mig.allocator import Allocator, LeaseClient, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import LeaseLost, Unsatisfiable, UnknownProfile
from prefect_mig.testing.holder_log import HolderLog
from prefect_mig.testing.redis_server import RedisServer

from .helpers import FLEET, ONE_SLICE, Holder, wait_until

REQUEST = SliceRequest(profile="4g.24gb", ttl_s=4)


def test_a_wipe_starts_a_new_epoch_in_the_events_stream():
    with RedisServer() as server:
        alloc = Allocator(server.client(), "faults")
        alloc.publish_fleet(FLEET, layouts=ONE_SLICE)
        alloc.try_acquire(REQUEST)
        before = alloc.events()
        assert before[0]["type"] == "cluster.epoch"
        server.client().flushall()
        alloc = Allocator(server.client(), "faults")  # a node agent started after the wipe
        alloc.publish_fleet(FLEET, layouts=ONE_SLICE)
        after = alloc.events()
        assert after[0]["type"] == "cluster.epoch" and int(after[0]["epoch"]) > int(before[0]["epoch"])
        alloc.try_acquire(REQUEST)  # the same slice again: a new epoch, not a double grant
        report = check_events(before + alloc.events())
        assert report.epochs == 2 and report.violations == []


def test_after_a_wipe_no_slice_goes_to_a_new_holder_while_the_old_one_may_still_run():
    with RedisServer() as server:
        agent = Allocator(server.client(), "faults", max_ttl_s=4)  # the node agent's allocator
        agent.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
        client, log = LeaseClient(server.url, "faults", max_ttl_s=4), HolderLog()
        old = Holder(client, log, REQUEST)
        server.client().flushall()  # Redis loses everything; the old holder's task runs on
        agent.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)  # the agent republishes
        assert agent.status()["slices"][0]["state"] == "quarantined"
        started = time.monotonic()
        new = Holder(client, log, REQUEST, timeout_s=20)
        assert old.lost.is_set(), "the new holder got the slice while the old one was never told"
        old.stop()
        new.stop()
        assert log.overlaps() == []
        assert time.monotonic() - started < 10  # settles after max_ttl_s (4 s), not never


def test_a_node_that_starts_after_the_wipe_publishes_without_quarantine():
    with RedisServer() as server:
        server.client().flushall()
        agent = Allocator(server.client(), "faults", max_ttl_s=4)
        agent.publish_fleet(FLEET, layouts=ONE_SLICE)
        wait_until(lambda: agent.status()["slices"][0]["state"] == "free", 1, "the slice in service")


def test_between_a_wipe_and_the_agents_publish_a_request_is_told_no_slice_is_published_not_that_h100s_lack_it():
    """An A30 cluster's request in the seconds after a wipe (no node published yet) was refused as
    'H100-80GB has no MIG profile 4g.24gb': the allocator judged it against a GPU model the cluster
    does not have."""
    with RedisServer() as server:
        agent = Allocator(server.client(), "faults")
        agent.publish_fleet(FLEET, layouts=ONE_SLICE)
        server.client().flushall()
        client = Allocator(server.client(), "faults")
        with pytest.raises(Unsatisfiable, match=r"4g\.24gb.*no slices at all \(is an agent running\?\)") as refused:
            client.try_acquire(REQUEST, wait=True)
        assert "H100" not in str(refused.value)
        with pytest.raises(UnknownProfile, match=r"'9g\.99gb'.*the catalog.*4g\.24gb"):  # still judged on every model
            client.try_acquire(SliceRequest(profile="9g.99gb"), wait=True)
        assert client.status()["queue"] == []
        Allocator(server.client(), "faults").publish_fleet(FLEET, layouts=ONE_SLICE)  # an agent started after the wipe
        assert client.try_acquire(REQUEST).slice.profile == "4g.24gb"


def test_a_request_waiting_when_redis_loses_its_data_is_told_so_not_that_it_was_abandoned():
    with RedisServer() as server:
        alloc = Allocator(server.client(), "faults", wait_ttl_s=3)
        alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
        alloc.try_acquire(REQUEST)  # the only slice is leased
        queued = alloc.try_acquire(REQUEST, wait=True)
        time.sleep(1.5)  # the wait went on a while before Redis lost everything
        server.client().flushall()
        with pytest.raises(LeaseLost, match=r"no longer queued: Redis lost its data while it waited .*Ask again") as gone:
            alloc.wait_for_grant(queued.request_id, 30)
        assert "abandoned" not in str(gone.value)
        alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)  # the agent republishes (quarantined)
        withdrawn = alloc.try_acquire(REQUEST, wait=True)
        alloc.give_up(withdrawn.request_id)  # gone from the queue with Redis's data intact: the old words
        with pytest.raises(LeaseLost, match=r"no longer queued \(dropped as abandoned\?\)"):
            alloc.wait_for_grant(withdrawn.request_id, 30)
