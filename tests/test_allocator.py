"""Allocator semantics on a real redis-server: placement, order, fencing, expiry, quotas, preemption."""

from __future__ import annotations

import math
import threading
import time

import pytest
from pydantic import ValidationError

from prefect_mig.allocator import Allocator, LeaseInfo, Queued, Quota, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import (
    ConfigError,
    InvalidRequirement,
    LeaseLost,
    LeaseNotOwned,
    NoCapacity,
    RedisUnavailable,
    Unsatisfiable,
    UnknownProfile,
    WaitTimeout,
)

from prefect_mig.model import get_model

from .allocator_fixtures import H100_MIXED


def one(profile="1g.10gb", **kw) -> SliceRequest:
    return SliceRequest(profile=profile, **kw)


def test_grant_returns_a_concrete_slice_with_a_fencing_token(one_h100):
    lease = one_h100.try_acquire(one("1g.10gb", holder="flow/1"))
    assert isinstance(lease, LeaseInfo)
    assert (lease.slice.profile, lease.slice.node) == ("1g.10gb", "node-a") and lease.fence > 0
    assert lease.slice.mig_uuid.startswith("MIG-")
    assert one_h100.lease(lease.lease_id).holder == "flow/1"


def test_minimum_request_gets_the_smallest_slice_that_satisfies(one_h100):
    assert one_h100.try_acquire(SliceRequest(min_memory_gb=5)).slice.profile == "1g.10gb"
    assert one_h100.try_acquire(SliceRequest(min_compute_slices=2)).slice.profile == "3g.40gb"


def test_placement_prefers_a_gpu_that_already_has_leases(alloc):
    alloc.publish_fleet("node-a=2xH100-80GB", layouts={"node-a": ["7g.80gb@0", H100_MIXED]})
    first = alloc.try_acquire(SliceRequest(min_memory_gb=5))
    assert first.slice.profile == "1g.10gb"
    second = alloc.try_acquire(SliceRequest(min_memory_gb=5))
    assert second.slice.gpu_uuid == first.slice.gpu_uuid and second.slice.profile == "1g.10gb"


def test_fencing_tokens_strictly_increase(one_h100):
    fences = []
    for _ in range(5):
        lease = one_h100.try_acquire(one())
        fences.append(lease.fence)
        one_h100.release(lease.lease_id, lease.fence)
    assert fences == sorted(set(fences)) and len(fences) == 5


def test_double_release_is_idempotent(one_h100):
    lease = one_h100.try_acquire(one())
    assert one_h100.release(lease.lease_id, lease.fence) is True
    assert one_h100.release(lease.lease_id, lease.fence) is False


def test_release_with_a_stale_token_is_refused_and_frees_nothing(one_h100):
    lease = one_h100.try_acquire(one("3g.40gb"))
    with pytest.raises(LeaseNotOwned) as refused:
        one_h100.release(lease.lease_id, lease.fence + 7)
    assert refused.value.lease_id == lease.lease_id
    assert str(lease.fence) not in str(refused.value)  # a wrong guess does not learn the fence
    with pytest.raises(NoCapacity):
        one_h100.try_acquire(one("3g.40gb"))


def test_renew_extends_and_a_stale_token_is_refused(one_h100, clock):
    lease = one_h100.try_acquire(one(ttl_s=10))
    clock.advance(8)
    assert one_h100.renew(lease.lease_id, lease.fence, 10) == clock.now_ms() + 10_000
    with pytest.raises(LeaseNotOwned) as refused:
        one_h100.renew(lease.lease_id, 999, 10)
    assert str(lease.fence) not in str(refused.value)


def test_renew_after_expiry_is_refused_and_the_slice_is_free_again(one_h100, clock):
    lease = one_h100.try_acquire(one("3g.40gb", ttl_s=5))
    clock.advance(6)
    with pytest.raises(LeaseLost) as lost:
        one_h100.renew(lease.lease_id, lease.fence, 5)
    assert lost.value.reason == "expired"
    again = one_h100.try_acquire(one("3g.40gb"))
    assert again.slice.id == lease.slice.id and again.fence > lease.fence
    assert one_h100.release(lease.lease_id, lease.fence) is False


def test_an_expired_lease_is_reaped_by_the_next_acquire(one_h100, clock):
    lease = one_h100.try_acquire(one("3g.40gb", ttl_s=5))
    clock.advance(5.5)
    again = one_h100.try_acquire(one("3g.40gb"))
    assert again.slice.id == lease.slice.id
    assert [e["type"] for e in one_h100.events()].count("lease.expired") == 1


def test_flushed_script_cache_is_reloaded(one_h100, redis_client):
    redis_client.script_flush()
    assert one_h100.try_acquire(one()).slice.profile == "1g.10gb"


def test_waiters_are_served_by_priority_then_fifo(one_h100):
    holder = one_h100.try_acquire(one("3g.40gb"))
    low = one_h100.try_acquire(one("3g.40gb", priority=1), wait=True)
    high_a = one_h100.try_acquire(one("3g.40gb", priority=5), wait=True)
    high_b = one_h100.try_acquire(one("3g.40gb", priority=5), wait=True)
    served = []
    current = holder
    for _ in range(3):
        one_h100.release(current.lease_id, current.fence)
        current = next(one_h100.lease(q.request_id) for q in (low, high_a, high_b) if _holds(one_h100, q))
        served.append(current.lease_id)
        one_h100.reap()
    assert served == [high_a.request_id, high_b.request_id, low.request_id]
    assert check_events(one_h100.events()).violations == []


def _holds(alloc, queued) -> bool:
    try:
        alloc.lease(queued.request_id)
    except LeaseLost:
        return False
    return True


def test_aging_lets_a_long_wait_beat_a_newer_higher_priority(one_h100, clock):
    holder = one_h100.try_acquire(one("3g.40gb"))
    old_low = one_h100.try_acquire(one("3g.40gb", priority=1), wait=True)
    clock.advance(3 * 60 + 1)  # 3 levels of aging
    new_high = one_h100.try_acquire(one("3g.40gb", priority=3), wait=True)
    one_h100.release(holder.lease_id, holder.fence)
    assert _holds(one_h100, old_low) and not _holds(one_h100, new_high)


def test_a_queued_big_request_does_not_block_a_small_one(one_h100):
    big = one_h100.try_acquire(one("3g.40gb"))
    waiting = one_h100.try_acquire(one("3g.40gb", priority=9), wait=True)
    assert isinstance(waiting, Queued)
    small = one_h100.try_acquire(one("1g.10gb", priority=0))
    assert small.slice.profile == "1g.10gb"
    one_h100.release(big.lease_id, big.fence)
    assert _holds(one_h100, waiting)


def test_waiting_is_pushed_to_the_waiter(one_h100):
    holder = one_h100.try_acquire(one("3g.40gb"))
    queued = one_h100.try_acquire(one("3g.40gb"), wait=True)
    threading.Timer(0.2, lambda: one_h100.release(holder.lease_id, holder.fence)).start()
    started = time.monotonic()
    lease = one_h100.wait_for_grant(queued.request_id, timeout_s=10)
    assert lease.slice.id == holder.slice.id and lease.waited_ms >= 0
    assert time.monotonic() - started < 1.5


def test_by_default_a_waiter_silent_for_ten_seconds_stays_queued_and_one_silent_past_15_s_is_dropped(
    redis_client, namespace, clock
):
    """A loaded machine (load average 20) starved a live waiter's touches for over 3 s, the old wait
    TTL, and it was dropped as abandoned (`LeaseLost: ... no longer queued`). The default wait TTL
    is 15 s: a waiter ten seconds late is still queued, a dead one is gone after 15 s."""
    alloc = Allocator(redis_client, namespace, clock=clock)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    alloc.try_acquire(one("3g.40gb", ttl_s=600))
    queued = alloc.try_acquire(one("3g.40gb"), wait=True)
    clock.advance(10)
    alloc.reap()
    assert [q["id"] for q in alloc.status()["queue"]] == [queued.request_id]
    clock.advance(5.5)
    alloc.reap()
    assert alloc.status()["queue"] == []


def test_a_wait_that_times_out_leaves_the_queue(one_h100):
    one_h100.try_acquire(one("3g.40gb"))
    with pytest.raises(WaitTimeout):
        one_h100.acquire(one("3g.40gb"), timeout_s=0.3)
    assert one_h100.status()["queue"] == []


def test_without_waiting_a_busy_profile_raises_no_capacity(one_h100):
    one_h100.try_acquire(one("3g.40gb"))
    with pytest.raises(NoCapacity) as refused:
        one_h100.acquire(one("3g.40gb"), timeout_s=0)
    assert refused.value.reason == "busy" and "3g.40gb" in str(refused.value)


def test_without_waiting_a_kind_no_gpu_is_carved_into_says_so_not_that_its_slices_are_leased(one_h100):
    """A new-user trial: `POST /v1/leases` for 7g.80gb with timeout_s 0, on a cluster whose
    repartitioner could carve one, answered "every matching slice is leased" with none carved."""
    one_h100.queue_uncarved = True  # a repartitioner runs
    with pytest.raises(NoCapacity) as refused:
        one_h100.acquire(one("7g.80gb"), timeout_s=0)
    said = str(refused.value)
    assert refused.value.reason == "uncarved" and "no GPU is carved for 7g.80gb" in said, said
    assert "leased" not in said, said
    assert one_h100.status()["queue"] == []


def test_a_kind_whose_last_slice_a_re_carve_removed_counts_as_uncarved_not_as_leased(one_h100):
    """A new-user trial: after the repartitioner re-carved the only 3g.40gb away, `lease acquire
    --profile 3g.40gb --timeout 0` said "every matching slice is leased" with no lease held, and a
    wait that timed out did not say that no GPU was carved for it."""
    one_h100.queue_uncarved = True  # a repartitioner runs
    gone = one_h100.try_acquire(one("3g.40gb"))
    one_h100.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["1g.10gb@0 + 1g.10gb@1 + 1g.10gb@4"]})
    one_h100.release(gone.lease_id, gone.fence)  # the re-carved slice leaves with its lease
    with pytest.raises(NoCapacity) as refused:
        one_h100.acquire(one("3g.40gb"), timeout_s=0)
    said = str(refused.value)
    assert refused.value.reason == "uncarved" and "no GPU is carved for 3g.40gb" in said, said
    with pytest.raises(WaitTimeout) as waited:
        one_h100.acquire(one("3g.40gb"), timeout_s=0.3)
    assert "no GPU carved for 3g.40gb" in str(waited.value), str(waited.value)
    assert one_h100.status()["queue"] == [] and one_h100.status()["leases"] == []
    one_h100.queue_uncarved = False  # and with no repartitioner nothing would ever carve one
    with pytest.raises(Unsatisfiable):
        one_h100.acquire(one("3g.40gb"), timeout_s=None)


def test_a_kind_an_older_version_left_in_the_carved_set_goes_at_the_next_publish(one_h100, redis_client):
    """The trial's cluster kept its Redis (AOF) across the upgrade: 4g.40gb, carved once and re-carved
    away before, still read as "every matching slice is leased"."""
    one_h100.queue_uncarved = True
    redis_client.sadd(one_h100.keys.pkeys, "H100-80GB/4g.40gb")  # what the version before left
    one_h100.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})  # an agent's next publish
    with pytest.raises(NoCapacity) as refused:
        one_h100.acquire(one("4g.40gb"), timeout_s=0)
    assert refused.value.reason == "uncarved", str(refused.value)


def test_a_gpu_model_whose_gpus_are_all_uncarved_still_takes_requests_for_its_profiles(alloc, redis_client, namespace):
    """A kind leaves the carved set with its last slice; the GPU model stays known while its GPUs
    are published, so a request only that model serves is not refused as an unknown profile
    while its GPUs are between a re-carve's destroy and create."""
    alloc.publish_fleet("node-a=1xH100-80GB,node-b=1xA30-24GB",
                        layouts={"node-a": [H100_MIXED], "node-b": ["4g.24gb@0"]})
    alloc.publish_fleet("node-a=1xH100-80GB,node-b=1xA30-24GB", layouts={"node-a": [H100_MIXED], "node-b": [""]})
    fresh = Allocator(redis_client, namespace, queue_uncarved=True)
    with pytest.raises(NoCapacity) as refused:
        fresh.acquire(one("1g.6gb"), timeout_s=0)
    assert refused.value.reason == "uncarved" and "no GPU is carved for 1g.6gb" in str(refused.value)


def test_a_profile_no_gpu_offers_is_unsatisfiable_with_what_exists(one_h100):
    with pytest.raises(Unsatisfiable) as refused:
        one_h100.acquire(one("7g.80gb"), timeout_s=None)
    assert "H100-80GB/1g.10gb" in refused.value.offered and "7g.80gb" in str(refused.value)
    assert one_h100.status()["queue"] == []


def test_a_profile_the_models_lack_lists_their_profiles(one_h100):
    with pytest.raises(UnknownProfile) as refused:
        one_h100.try_acquire(one("1g.6gb"))
    assert "3g.40gb" in str(refused.value)


def test_quota_holds_a_tenant_back_until_it_releases(one_h100):
    one_h100.set_quota("team-a", Quota(slices=1))
    first = one_h100.try_acquire(one(tenant="team-a"))
    with pytest.raises(NoCapacity) as refused:
        one_h100.try_acquire(one(tenant="team-a"))
    assert refused.value.reason == "quota"
    queued = one_h100.try_acquire(one(tenant="team-a"), wait=True)
    other = one_h100.try_acquire(one(tenant="team-b"))  # other tenants are not held back
    assert other.slice.profile == "1g.10gb"
    one_h100.release(first.lease_id, first.fence)
    assert _holds(one_h100, queued)


def test_compute_quota_counts_compute_slices(one_h100):
    one_h100.set_quota("team-a", Quota(compute=3))
    one_h100.try_acquire(one("1g.10gb", tenant="team-a"))
    with pytest.raises(NoCapacity):
        one_h100.try_acquire(one("3g.40gb", tenant="team-a"))


def test_preemption_revokes_a_lower_priority_preemptible_lease_after_grace(one_h100, clock):
    victim = one_h100.try_acquire(one("3g.40gb", priority=1, preemptible=True))
    urgent = one_h100.try_acquire(one("3g.40gb", priority=9), wait=True)
    with pytest.raises(LeaseLost) as told:
        one_h100.renew(victim.lease_id, victim.fence, 60)
    assert told.value.reason == "revoked"
    assert not _holds(one_h100, urgent)  # the holder keeps it for the grace period
    clock.advance(5.1)
    one_h100.reap()
    got = one_h100.lease(urgent.request_id)
    assert got.slice.id == victim.slice.id and got.fence > victim.fence
    types = [e["type"] for e in one_h100.events()]
    assert types.index("lease.revoked") < types.index("lease.expired")


def test_a_non_preemptible_or_higher_priority_lease_is_never_revoked(one_h100):
    keep = one_h100.try_acquire(one("3g.40gb", priority=1, preemptible=False))
    one_h100.try_acquire(one("3g.40gb", priority=9), wait=True)
    one_h100.renew(keep.lease_id, keep.fence, 60)
    one_h100.release(keep.lease_id, keep.fence)
    high = one_h100.try_acquire(one("1g.10gb", priority=9, preemptible=True))
    one_h100.try_acquire(one("1g.10gb", priority=9), wait=True)  # same priority: no revocation
    one_h100.renew(high.lease_id, high.fence, 60)


def test_a_drained_gpu_grants_nothing_until_resumed(one_h100):
    held = one_h100.try_acquire(one("1g.10gb"))
    assert one_h100.drain(held.slice.gpu_uuid) == 1
    with pytest.raises(NoCapacity):
        one_h100.try_acquire(one("3g.40gb"))
    queued = one_h100.try_acquire(one("3g.40gb"), wait=True)
    one_h100.renew(held.lease_id, held.fence, 60)  # running work is not disturbed
    one_h100.resume(held.slice.gpu_uuid)
    assert _holds(one_h100, queued)


def test_a_node_whose_heartbeat_stops_gets_no_new_grants_until_back(alloc, clock):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=10)
    clock.advance(11)
    assert alloc.reap()[2] == 1
    with pytest.raises(NoCapacity):
        alloc.try_acquire(one())
    assert alloc.heartbeat("node-a", ttl_s=10) == "back"
    assert alloc.try_acquire(one()).slice.node == "node-a"


def test_republishing_without_a_leased_slice_removes_it_when_released(alloc):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    held = alloc.try_acquire(one("3g.40gb"))
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"]})
    assert held.slice.id in {s["id"] for s in alloc.status()["slices"]}
    alloc.release(held.lease_id, held.fence)
    assert held.slice.id not in {s["id"] for s in alloc.status()["slices"]}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"profile": "1g.10gb", "priority": 101}, "priority"),
        ({"profile": "1g.10gb", "priority": -1}, "priority"),
        ({"profile": "1g.10gb", "ttl_s": 0}, "ttl_s"),
        ({"profile": "1g.10gb", "tenant": "team a"}, "tenant"),
        ({"profile": "1g.10gb", "node": ""}, "node"),
        ({"profile": "ten gigs"}, "profile"),
        ({"min_memory_gb": 0}, "min_memory_gb"),
        ({"min_compute_slices": 9}, "min_compute_slices"),
        ({"profile": "1g.10gb", "min_memory_gb": 10}, "not both"),
        ({}, "give an exact profile"),
        ({"profile": "1g.10gb", "holder": "x" * 300}, "holder"),
        ({"profile": "1g.10gb", "colour": "red"}, "colour"),
    ],
)
def test_each_request_field_is_validated_and_named(fields, field):
    with pytest.raises(ValidationError) as refused:
        SliceRequest(**fields)
    assert field in str(refused.value)


def test_an_unknown_gpu_model_constraint_lists_the_models():
    with pytest.raises(ValidationError) as refused:
        SliceRequest(profile="1g.10gb", gpu_model="H999")
    assert "unknown GPU model 'H999'" in str(refused.value) and "H100-80GB" in str(refused.value)


def test_a_gpu_model_the_fleet_lacks_says_so_and_names_the_models_it_has(one_h100):
    """1g.6gb is an A30 profile: what is missing is an A30 in the fleet, not the profile."""
    with pytest.raises(Unsatisfiable) as refused:
        one_h100.acquire(SliceRequest(profile="1g.6gb", gpu_model="A30-24GB"), timeout_s=5)
    said = str(refused.value)
    assert (refused.value.field, refused.value.value) == ("gpu_model", "A30-24GB")
    assert "gpu_model" in said and "no A30-24GB GPU" in said and "H100-80GB" in said and "has no MIG profile" not in said
    assert one_h100.status()["queue"] == [] and one_h100.status()["leases"] == []


@pytest.mark.parametrize("timeout_s", [-1, 40 * 86_400, math.inf])
def test_a_wait_out_of_range_is_refused_naming_the_longest_in_plain_seconds(timeout_s):
    """Found by a new-user trial: the message gave the longest wait as "2.592e+06 (30 days)"."""
    from prefect_mig.allocator.allocator import check_wait

    with pytest.raises(ConfigError) as refused:
        check_wait(timeout_s)
    said = str(refused.value)
    assert said.startswith(f"timeout_s={timeout_s!r}: ") and "to 2592000 (30 days)" in said and "e+" not in said, said


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"min_memory_gb": 500}, "min_memory_gb=500"), ({"min_compute_slices": 8}, "min_compute_slices=8"),
     ({"min_memory_gb": 90, "min_compute_slices": 2}, "min_memory_gb=90, min_compute_slices=2")],
)
def test_minimums_no_gpu_of_the_fleet_meets_are_refused_naming_the_fields_and_the_largest_slice(one_h100, fields, named):
    """Found by a new-user trial: the error named a field "requirement" that no caller sets, and
    not how much the fleet's GPUs give at most."""
    with pytest.raises(InvalidRequirement) as refused:
        one_h100.acquire(SliceRequest(**fields), timeout_s=5)
    said = str(refused.value)
    assert said.startswith(f"{named}: no profile on H100-80GB gives "), said
    assert "the largest there is 7g.80gb on H100-80GB (80 GB, 7 compute slices)" in said, said
    assert one_h100.status()["queue"] == [] and one_h100.status()["leases"] == []


def test_a_node_nobody_published_is_refused_at_once_naming_the_published_nodes(one_h100):
    """Found by a bad-input review: such a request was queued (and the repartitioner re-carved
    another node's GPU for it); with timeout 0 it was told "every matching slice is leased"."""
    for timeout_s in (0, 60):
        started = time.monotonic()
        with pytest.raises(Unsatisfiable) as refused:
            one_h100.acquire(SliceRequest(profile="1g.10gb", node="no-such-node"), timeout_s=timeout_s)
        assert time.monotonic() - started < 30  # refused, not waited out
        said = str(refused.value)
        assert (refused.value.field, refused.value.value) == ("node", "no-such-node")
        assert "node" in said and "no-such-node" in said and "node-a" in said
    assert one_h100.status()["queue"] == [] and one_h100.status()["leases"] == []


def test_a_drained_or_silent_node_still_counts_as_published(one_h100):
    """It may come back: a request pinned to it waits (or, without waiting, finds no capacity)."""
    one_h100.drain_node("node-a")
    with pytest.raises(NoCapacity):
        one_h100.acquire(SliceRequest(profile="1g.10gb", node="node-a"), timeout_s=0)
    one_h100.drain_node("node-a", drain=False)
    one_h100.node_down("node-a", why="engine down")
    with pytest.raises(NoCapacity):
        one_h100.acquire(SliceRequest(profile="1g.10gb", node="node-a"), timeout_s=0)


def test_a_profile_the_pinned_model_lacks_lists_that_models_profiles_only(one_h100):
    with pytest.raises(UnknownProfile) as refused:
        one_h100.acquire(SliceRequest(profile="1g.10gb", gpu_model="A30-24GB"), timeout_s=5)
    assert (refused.value.field, refused.value.value, refused.value.gpu_model) == ("profile", "1g.10gb", "A30-24GB")
    assert set(refused.value.known) == set(get_model("A30-24GB").profile_names)
    assert "1g.6gb" in str(refused.value) and "7g.80gb" not in str(refused.value)


def test_unreachable_redis_is_a_clear_error_within_the_timeout():
    import redis as redis_lib

    client = redis_lib.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as refused:
        Allocator(client, "x").try_acquire(one())
    assert time.monotonic() - started < 5
    assert "PREFECT_MIG_REDIS_URL" in str(refused.value)


def test_every_key_the_lua_builds_is_named_in_the_keys_module():
    import re
    from pathlib import Path

    from prefect_mig.allocator.keys import Keys

    lib = (Path(__file__).parents[1] / "prefect_mig" / "allocator" / "lua" / "_lib.lua").read_text()
    built = set(re.findall(r"return P \.\. '([a-z_]+):' \.\. \w+ end", lib))
    keys = Keys("n")
    assert built and all(getattr(keys, name)("x") == f"pmig:{{n}}:{name}:x" for name in built), built


def test_the_lua_reads_the_keys_in_the_order_the_scripts_pass_them():
    """The fixed keys, then the node's claim (the scripts an agent runs for its node): a fixed key added
    on one side only would make every script read another key than it names."""
    import re
    from pathlib import Path

    from prefect_mig.allocator.scripts import FIXED_KEYS

    lib = (Path(__file__).parents[1] / "prefect_mig" / "allocator" / "lua" / "_lib.lua").read_text()
    table = lib[lib.index("local K = {"):lib.index("}", lib.index("local K = {"))]
    read = {int(i): name for name, i in re.findall(r"(\w+) = KEYS\[(\d+)\]", table)}
    assert [read[i] for i in sorted(read)] == [*FIXED_KEYS, "node_claim"] and sorted(read) == list(range(1, len(read) + 1))


def test_no_script_builds_the_key_of_a_nodes_claim_it_could_be_passed():
    """Redis Cluster routes a script by the keys it is passed: a key the caller knows goes in KEYS
    (the node's claim, after the fixed ones), only the entities a script picks itself are built in Lua."""
    from pathlib import Path

    lua = Path(__file__).parents[1] / "prefect_mig" / "allocator" / "lua"
    building = sorted(f.name for f in lua.glob("*.lua") if "'agent:'" in f.read_text())
    assert building == [], f"{building} build the node's claim key in Lua"


def test_a_write_fenced_by_an_agents_claim_names_the_node_it_is_for_or_is_refused_changing_nothing(one_h100):
    ids = sorted(s["id"] for s in one_h100.status()["slices"])
    with pytest.raises(ConfigError) as refused:
        one_h100.withdraw(ids, agent="agent-a")
    assert refused.value.field == "node" and "give the node's name" in str(refused.value)
    assert set(one_h100.slice_states(ids).values()) == {"free"}


def test_a_request_pinned_to_a_node_nobody_published_times_out_saying_so_in_round_seconds(alloc):
    """Queued while no node was published yet (agents starting); then nodes publish, not that one."""
    from prefect_mig.allocator.health import wait_reasons

    alloc.queue_uncarved = True
    started = time.monotonic()
    request = SliceRequest(profile="1g.10gb", node="node-zz")
    queued = alloc.try_acquire(request, wait=True)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    assert "no node named node-zz is published (nodes: node-a)" in wait_reasons(alloc, queued.request_id)
    with pytest.raises(WaitTimeout) as refused:
        alloc.wait_for_grant(queued.request_id, 1.25, request=request, asked_s=1.25, explain=True)
    said = str(refused.value)
    assert "no slice within 1.25 s;" in said, said  # the caller's timeout, not what was left of it
    assert "no node named node-zz is published (nodes: node-a)" in said
    assert time.monotonic() - started < 30 and alloc.status()["queue"] == []


@pytest.mark.parametrize(
    "request_, fleet, layout",
    [(SliceRequest(min_memory_gb=20), "node-a=1xA30-24GB", "4g.24gb@0"),
     (SliceRequest(profile="1g.10gb"), "node-a=1xA100-80GB", "1g.10gb@0")],
    ids=["min-memory-on-A30", "profile-on-A100"],
)
def test_a_request_queued_before_any_node_published_is_served_by_the_first_node_whatever_its_model(alloc, request_, fleet, layout):
    """Queued while no node was published yet (agents starting), a request waited as H100-80GB kinds
    only: the A30 (or A100) node that published next had a free slice for it and never served it."""
    alloc.queue_uncarved = True
    queued = alloc.try_acquire(request_, wait=True)
    assert isinstance(queued, Queued)
    alloc.publish_fleet(fleet, layouts={"node-a": [layout]})
    lease = alloc.wait_for_grant(queued.request_id, 10, request=request_)
    assert f"{lease.slice.gpu_model}/{lease.slice.profile}@{lease.slice.start}" == f"{fleet.split('x')[1]}/{layout}"
    assert alloc.status()["queue"] == []
    report = check_events(alloc.events())
    assert report.violations == []


def test_a_request_that_waits_on_a_drained_node_says_it_is_drained(one_h100):
    from prefect_mig.allocator.health import wait_reasons

    one_h100.drain_node("node-a")
    pinned = one_h100.try_acquire(SliceRequest(profile="1g.10gb", node="node-a"), wait=True)
    anywhere = one_h100.try_acquire(SliceRequest(profile="1g.10gb"), wait=True)
    resume = "node-a is drained for maintenance: no new grants there until `prefect-mig node resume node-a`"
    assert resume in wait_reasons(one_h100, pinned.request_id)
    assert resume in wait_reasons(one_h100, anywhere.request_id)


def test_a_retried_acquire_with_the_same_request_id_returns_the_same_lease(one_h100):
    first = one_h100.try_acquire(one("3g.40gb"), request_id="retry-me")
    again = one_h100.try_acquire(one("3g.40gb"), request_id="retry-me")
    assert (again.lease_id, again.fence, again.slice.id) == (first.lease_id, first.fence, first.slice.id)
    assert len(one_h100.status()["leases"]) == 1


def test_a_waiting_request_says_why_it_waits_queue_position_stale_agents_and_uncarved_kinds(one_h100, clock):
    from prefect_mig.allocator import SliceRequest
    from prefect_mig.allocator.health import agents, wait_reasons

    one_h100.try_acquire(SliceRequest(profile="3g.40gb"))
    queued = one_h100.try_acquire(SliceRequest(profile="3g.40gb"), wait=True)
    assert wait_reasons(one_h100, queued.request_id) == ["position 1 of 1 in the queue"]
    clock.advance(45)  # the agent of node-a stops heartbeating (TTL 30 s)
    assert agents(one_h100)["node-a"] == {"age_s": 45.0, "ttl_s": 30.0, "stale": True, "agent": None}
    assert "node-a's agent last heartbeated 45 s ago" in wait_reasons(one_h100, queued.request_id)
    one_h100.heartbeat("node-a")
    assert agents(one_h100)["node-a"]["stale"] is False
    one_h100.queue_uncarved = True
    big = one_h100.try_acquire(SliceRequest(profile="7g.80gb"), wait=True)
    assert "no GPU carved for 7g.80gb; a repartitioner is not running" in " ".join(wait_reasons(one_h100, big.request_id))
    one_h100.announce_repartitioner(60)
    assert "a repartitioner is running" in " ".join(wait_reasons(one_h100, big.request_id))


def test_a_request_held_back_by_its_tenants_quota_says_so_while_slices_are_free(one_h100):
    """It said only "position 1 of 1 in the queue", beside free slices (a new user's trial)."""
    from prefect_mig.allocator.health import wait_reasons

    one_h100.set_quota("team-q", Quota(slices=1))
    one_h100.try_acquire(SliceRequest(profile="1g.10gb", tenant="team-q"))
    queued = one_h100.try_acquire(SliceRequest(profile="1g.10gb", tenant="team-q"), wait=True)
    assert "tenant team-q holds 1 slice(s), its quota (`prefect-mig quota list`)" in wait_reasons(one_h100, queued.request_id)
    one_h100.set_quota("team-q", Quota(compute=4))  # the queued 1g goes through: 2 of 4 held
    big = one_h100.try_acquire(SliceRequest(profile="3g.40gb", tenant="team-q"), wait=True)
    said = wait_reasons(one_h100, big.request_id)
    assert "tenant team-q holds 2 of its quota of 4 compute slice(s), and a 3g needs 3 (`prefect-mig quota list`)" in said
    one_h100.set_quota("team-q", None)
    assert not [r for r in wait_reasons(one_h100, big.request_id) if "quota" in r]


def test_a_gpu_a_node_no_longer_publishes_leaves_the_inventory_once_none_of_its_slices_is_leased(alloc):
    # A host whose GPUs were replaced (or whose agent now runs another fleet): `up`, `layout apply`
    # and `gpus()` listed the old GPUs beside the new ones, under the same node and index, for good.
    alloc.publish_fleet("node-a=2xH100-80GB", layouts={"node-a": [H100_MIXED, H100_MIXED]})
    held = alloc.try_acquire(one("3g.40gb"))
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    models = sorted(g["gpu_model"] for g in alloc.gpus() if g["node"] == "node-a")
    assert models == ["A30-24GB", "H100-80GB"]  # the leased slice's GPU stays while its lease runs
    alloc.release(held.lease_id, held.fence)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    assert [(g["gpu_model"], g["index"]) for g in alloc.gpus() if g["node"] == "node-a"] == [("A30-24GB", 0)]


def test_an_allocator_says_its_namespace(redis_client, namespace):
    # a platform engineer's trial: `Allocator(r, "prod").namespace` was an AttributeError (only `.keys.namespace`)
    assert Allocator(redis_client, namespace).namespace == namespace
