"""Random sequences of acquire / release / cancel / time passing on a real Redis, with the
invariants checked after every step from the events stream and from the state."""

from __future__ import annotations

import uuid

import redis as redis_lib
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from prefect_mig.allocator import Allocator, LeaseInfo, ManualClock, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import LeaseLost, NoCapacity

from .allocator_fixtures import H100_MIXED

SERVER: dict = {}


class AllocatorMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.client = redis_lib.Redis.from_url(SERVER["url"])
        self.clock = ManualClock()
        self.alloc = Allocator(self.client, "h" + uuid.uuid4().hex[:10], clock=self.clock, aging_s=30, grace_s=2)
        self.alloc.publish_fleet(
            "node-a=2xH100-80GB", layouts={"node-a": [H100_MIXED, "2g.20gb@0 + 2g.20gb@2 + 3g.40gb@4"]}
        )
        self.held: dict[str, LeaseInfo] = {}
        self.queued: list[str] = []

    @rule(
        profile=st.sampled_from(["1g.10gb", "2g.20gb", "3g.40gb", None]),
        priority=st.integers(0, 5),
        preemptible=st.booleans(),
        wait=st.booleans(),
    )
    def acquire(self, profile, priority, preemptible, wait):
        req = (
            SliceRequest(profile=profile, priority=priority, preemptible=preemptible, ttl_s=10)
            if profile
            else SliceRequest(min_memory_gb=15, priority=priority, preemptible=preemptible, ttl_s=10)
        )
        try:
            got = self.alloc.try_acquire(req, wait=wait)
        except NoCapacity:
            return
        if isinstance(got, LeaseInfo):
            self.held[got.lease_id] = got
        else:
            self.queued.append(got.request_id)

    @rule(data=st.data())
    def release(self, data):
        self._collect()
        if self.held:
            lease_id = list(self.held)[data.draw(st.integers(0, len(self.held) - 1))]
            lease = self.held.pop(lease_id)
            self.alloc.release(lease.lease_id, lease.fence)

    @rule(data=st.data())
    def cancel(self, data):
        if self.queued:
            rid = self.queued[data.draw(st.integers(0, len(self.queued) - 1))]
            if self.alloc.cancel(rid) != "granted":
                self.queued.remove(rid)

    @rule(seconds=st.sampled_from([1, 3, 11]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)
        self.alloc.reap()

    @rule(data=st.data())
    def renew(self, data):
        if self.held:
            lease = list(self.held.values())[data.draw(st.integers(0, len(self.held) - 1))]
            try:
                self.alloc.renew(lease.lease_id, lease.fence, 10)
            except LeaseLost:
                self.held.pop(lease.lease_id)

    def _collect(self):
        for rid in list(self.queued):
            try:
                self.held[rid] = self.alloc.lease(rid)
                self.queued.remove(rid)
            except LeaseLost:
                pass

    @invariant()
    def the_events_keep_every_promise(self):
        report = check_events(self.alloc.events())
        assert report.violations == []

    @invariant()
    def each_slice_state_matches_its_lease(self):
        status = self.alloc.status()
        live = {row["slice"]: row["lease_id"] for row in status["leases"]}
        for s in status["slices"]:
            if s["state"] == "leased":
                assert live.get(s["id"]) == s["lease"], s
            else:
                assert s["id"] not in live, s
        assert len(live) == len(status["leases"])

    @invariant()
    def no_slice_idles_while_a_waiter_accepts_it(self):
        status = self.alloc.status()
        free = {s["pkey"] for s in status["slices"] if s["state"] == "free"}
        for r in status["queue"]:
            assert not free & set(r["pkeys"]), (free, r)

    def teardown(self):
        if hasattr(self, "client"):
            self.client.close()


AllocatorMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_allocator_invariants_hold_under_random_sequences(redis_server):
    SERVER["url"] = redis_server.url
    AllocatorMachine.TestCase().runTest()
