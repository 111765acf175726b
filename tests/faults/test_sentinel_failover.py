"""A replicated Redis (primary, two replicas, three Sentinels: real processes) loses its primary to
SIGKILL during lease churn. Holders reach Redis through a ``redis+sentinel://`` URL and count a grant
or renewal only once a replica has it (``replicas=1``). Checked: no slice is used by two holders
(the independent overlap checker), a holder whose lease ended without it is told first, fencing
tokens granted after the failover are above every token granted before, and granting resumes within
the failover time: with ``REPLICAS=1`` and two replicas, one replica is left after the promotion, so
grants need not wait for the old primary to come back."""

from __future__ import annotations

import random
import threading
import time

import pytest

from prefect_mig.allocator import LeaseClient, SliceRequest
from prefect_mig.allocator.connection import client_for_url, connect
from prefect_mig.errors import ConfigError, LeaseLost, RedisUnavailable, WaitTimeout
from prefect_mig.settings import Settings
from prefect_mig.testing.holder_log import HolderLog
from prefect_mig.testing.sentinel import ReplicatedRedis

from .helpers import wait_until

FLEET = "node-a=1xA30-24GB"
LAYOUT = {"node-a": ["1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3"]}
REQUEST = SliceRequest(profile="1g.6gb", ttl_s=4)
WORKERS = 5
#: bound on every wait for the failover itself (Sentinel's down-after of 2 s, its election and
#: promotion), generous for a loaded machine
FAILOVER_WITHIN_S = 60
#: after the Sentinels name the new primary, the first grant may still need: the remaining replica
#: told to follow it (Sentinel's next tick), its partial resync, a holder's reconnect and retry
#: (0.05 s pause); a few hundred ms when quiet, allowing for a loaded 2-core machine
RESUME_MARGIN_S = 8


@pytest.fixture
def replicated(redis_server):  # redis_server: skips (or fails under CI) without redis-server
    with ReplicatedRedis(service="pmig-failover", replicas=2) as cluster:
        yield cluster


class Churn:
    """Workers that take a slice, use it for a moment and give it back, recording every use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.log = HolderLog()
        self.grants: list[tuple[float, int]] = []  # (when granted, fence)
        self.asked_grants: list[tuple[float, float]] = []  # (when asked, when granted)
        self.silent_losses: list[str] = []  # releases that found the lease gone, without on_lost first
        self.told = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        client = LeaseClient(self.url, "failover", replicas=1, replica_timeout_s=1.0, wait_ttl_s=3)
        while not self.stop.is_set():
            lost = threading.Event()
            asked = time.monotonic()
            try:
                lease = client.acquire(REQUEST, timeout_s=3, on_lost=lambda _lease, _exc: lost.set())
            except (WaitTimeout, RedisUnavailable, LeaseLost):
                time.sleep(0.05)
                continue
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            start = time.time()
            with self._lock:
                self.grants.append((time.monotonic(), lease.fence))
                self.asked_grants.append((asked, self.grants[-1][0]))
            lost.wait(rng.uniform(0.1, 0.6))
            end = time.time()  # it stops using the slice now (or it stopped when told)
            self.log.add(lease.slice.id, lease.fence, start, end)
            told = lost.is_set()
            try:
                released = lease.release()
            except RedisUnavailable:
                continue  # the lease runs out on its own; this holder is done with it
            with self._lock:
                self.told += told
                if not released and not told:
                    self.silent_losses.append(f"lease {lease.lease_id} fence {lease.fence}")


def test_a_primary_killed_during_churn_loses_no_acknowledged_lease(replicated):
    setup = LeaseClient(replicated.url, "failover", replicas=1)
    setup.allocator.publish_fleet(FLEET, layouts=LAYOUT, heartbeat_ttl_s=3600)
    # one holder keeps its slice across the failover on a 2 s lease: it cannot renew while there is
    # no primary (Sentinel waits 2 s before calling it down), so it must be told before the lease ends
    told_at: list[float] = []
    across = setup.acquire(REQUEST.model_copy(update={"ttl_s": 2}), timeout_s=30, on_lost=lambda _l, _e: told_at.append(time.time()))
    across_start = time.time()
    churn = Churn(replicated.url)
    workers = [threading.Thread(target=churn.run, args=(i,), daemon=True) for i in range(WORKERS)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(churn.grants) >= 20, 120, "20 grants before the failover")
        old_port = replicated.primary.port
        replicated.primary.kill()
        killed = time.monotonic()
        replicated.wait_for_failover(old_port, timeout_s=FAILOVER_WITHIN_S)
        failed_over = time.monotonic()  # from now on the old primary is dead (it stays dead a while)
        # the first grant asked for once the primary was dead (one asked before may land just after)
        wait_until(lambda: any(asked > killed for asked, _ in churn.asked_grants), FAILOVER_WITHIN_S, "a grant after the kill")
        resumed_s = min(at for asked, at in churn.asked_grants if asked > killed) - killed
        wait_until(lambda: told_at, 30, "the holder that could not renew being told")
        churn.log.add(across.slice.id, across.fence, across_start, told_at[0])  # it stopped when told
        replicated.primary.start()  # back on its port: Sentinel makes it the new primary's replica
        wait_until(lambda: replicated.replicas_seen() >= 2, FAILOVER_WITHIN_S, "the old primary back as a replica")
        replica_back = time.monotonic()
        wait_until(
            lambda: sum(at > killed for at, _ in churn.grants) >= 20, 120, "20 grants after the failover"
        )
    finally:
        churn.stop.set()
        for worker in workers:
            worker.join(30)
    assert not churn.errors, churn.errors
    assert churn.log.overlaps() == [], "a slice was used by two holders at once"
    assert churn.silent_losses == [], "holders found their lease gone without being told"
    before = [fence for at, fence in churn.grants if at < killed]
    after = [fence for at, fence in churn.grants if at > failed_over]
    assert min(after) > max(before), "a fencing token went backwards across the failover"
    assert resumed_s < failed_over - killed + RESUME_MARGIN_S, (
        f"granting resumed {resumed_s:.1f} s after the kill, the failover took {failed_over - killed:.1f} s"
    )
    print(
        f"failover {failed_over - killed:.1f} s, a replica again {replica_back - killed:.1f} s, granting resumed "
        f"{resumed_s:.1f} s after the kill; {churn.told} churn holders were told of a loss"
    )


def test_a_grant_no_replica_acknowledged_is_given_back_and_the_caller_told(redis_client, namespace):
    alloc = LeaseClient(redis_client, namespace, replicas=1, replica_timeout_s=0.2).allocator
    alloc.publish_fleet(FLEET, layouts=LAYOUT, heartbeat_ttl_s=600)
    with pytest.raises(RedisUnavailable, match="0 of the 1 replica"):
        alloc.acquire(REQUEST, timeout_s=0)  # this Redis has no replica
    assert alloc.status()["leases"] == []


@pytest.mark.parametrize("url", ["redis+sentinel://127.0.0.1/pmig", "redis+sentinel://127.0.0.1:26379", "redis+sentinel://h:1/a/b/c"])
def test_a_sentinel_url_that_does_not_parse_is_refused_naming_the_form(url):
    with pytest.raises(ConfigError) as refused:
        client_for_url(url)
    assert refused.value.field == "redis_url" and "service-name" in str(refused.value)


def test_the_settings_take_a_sentinel_url_with_its_password_hidden_in_errors():
    settings = Settings(redis_url="redis+sentinel://pmig:s3cret@10.0.0.1:26379,10.0.0.2:26379/pmig/0", redis_replicas=1)
    client = connect(settings)
    assert client.connection_pool.service_name == "pmig"
    assert client.connection_pool.connection_kwargs["password"] == "s3cret"
    with pytest.raises(ConfigError) as refused:
        client_for_url("redis+sentinel://pmig:s3cret@10.0.0.1/pmig")
    assert "s3cret" not in str(refused.value)
