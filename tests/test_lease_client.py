"""LeaseClient and Lease across threads and real processes: renewal, loss, SIGKILL, SIGSTOP,
Redis restarts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from prefect_mig.allocator import Allocator, LeaseClient, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import LeaseLost, RedisUnavailable

from .allocator_fixtures import H100_MIXED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def client(redis_server, namespace):
    c = LeaseClient(redis_server.url, namespace, grace_s=1)
    c.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    return c


def test_lease_context_releases_on_exception(client):
    with pytest.raises(RuntimeError), client.lease(SliceRequest(profile="3g.40gb")) as lease:
        assert lease.mig_uuid.startswith("MIG-")
        raise RuntimeError("task body failed")
    assert client.allocator.status()["leases"] == []
    assert [e["type"] for e in client.allocator.events()][-1] == "lease.released"


def test_a_lease_renews_itself_past_its_ttl(client):
    with client.lease(SliceRequest(profile="1g.10gb", ttl_s=1)) as lease:
        time.sleep(1.6)
        client.allocator.reap()
        assert client.allocator.lease(lease.lease_id).fence == lease.fence
        assert not lease.lost.is_set()


def test_a_preempted_holder_is_told_through_on_lost(client):
    told = []
    lease = client.acquire(
        SliceRequest(profile="3g.40gb", priority=1, preemptible=True, ttl_s=1.5),
        on_lost=lambda held, exc: told.append(exc),
    )
    waiter = threading.Thread(
        target=lambda: client.acquire(SliceRequest(profile="3g.40gb", priority=9), timeout_s=10).release()
    )
    waiter.start()
    assert lease.lost.wait(3)
    assert isinstance(told[0], LeaseLost) and told[0].reason == "revoked"
    lease.release()  # hand it over before the grace period ends
    waiter.join(10)
    assert not waiter.is_alive()


def test_a_lease_that_cannot_reach_redis_is_declared_lost_by_its_ttl(fresh_redis_server, namespace):
    client = LeaseClient(fresh_redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    lease = client.acquire(SliceRequest(profile="4g.24gb", ttl_s=1.2))
    fresh_redis_server.kill()
    assert lease.lost.wait(3)
    assert isinstance(lease.lost_reason, LeaseLost) and lease.lost_reason.reason == "expired"
    fresh_redis_server.start()


def test_confirm_renews_a_held_lease_and_refuses_a_revoked_one_or_an_unreachable_redis(fresh_redis_server, namespace):
    """What a container start waits for (`start_confirmed`): a renewal Redis answered."""
    client = LeaseClient(fresh_redis_server.url, namespace, grace_s=30)
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    held = client.acquire(SliceRequest(profile="2g.12gb", ttl_s=20))
    victim = client.acquire(SliceRequest(profile="2g.12gb", ttl_s=20, priority=1, preemptible=True))
    before = client.allocator.lease(held.lease_id).expires_at_ms
    time.sleep(0.05)
    held.confirm()
    assert client.allocator.lease(held.lease_id).expires_at_ms > before
    client.allocator.try_acquire(SliceRequest(profile="2g.12gb", priority=9), wait=True)  # revokes the victim
    with pytest.raises(LeaseLost, match="revoked"):
        victim.confirm()
    fresh_redis_server.kill()
    try:
        with pytest.raises(RedisUnavailable):
            held.confirm()
    finally:
        fresh_redis_server.start()


def test_an_abandoned_lease_is_not_released_but_lapses(client):
    """A holder that cannot confirm its container ended leaves the lease to expire (and, on a
    node with a fencing agent, its slice to quarantine) instead of handing the slice on."""
    lease = client.acquire(SliceRequest(profile="3g.40gb", ttl_s=1))
    lease.abandon()
    assert lease.release() is False  # release after abandon gives nothing back
    assert [r["lease_id"] for r in client.allocator.status()["leases"]] == [lease.lease_id]
    time.sleep(1.3)
    client.allocator.reap()
    assert client.allocator.status()["leases"] == []
    assert "lease.released" not in [e["type"] for e in client.allocator.events()]


def test_redis_down_gives_a_clear_error_within_the_timeout(fresh_redis_server, namespace):
    client = LeaseClient(fresh_redis_server.url, namespace)
    fresh_redis_server.kill()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        client.acquire(SliceRequest(profile="1g.10gb"), timeout_s=1)
    assert time.monotonic() - started < 5
    fresh_redis_server.start()


def test_acknowledged_leases_survive_a_redis_restart(fresh_redis_server, namespace):
    alloc = Allocator(fresh_redis_server.client(), namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    lease = alloc.try_acquire(SliceRequest(profile="3g.40gb", ttl_s=60))
    time.sleep(1.2)  # appendfsync everysec
    fresh_redis_server.restart()
    after = Allocator(fresh_redis_server.client(), namespace)
    assert after.lease(lease.lease_id).fence == lease.fence
    assert after.renew(lease.lease_id, lease.fence, 60) > 0  # NOSCRIPT after restart is handled
    nxt = after.try_acquire(SliceRequest(min_memory_gb=5))
    assert nxt.slice.id != lease.slice.id and nxt.fence > lease.fence


def _worker(url, ns, *args, stdin=subprocess.PIPE):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.lease_worker", *args[:1], url, ns, *args[1:]],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_holder_paused_past_its_ttl_is_fenced_out_after_resuming(client, redis_server, namespace):
    holder = _worker(redis_server.url, namespace, "hold", "3g.40gb", "1")
    granted = holder.stdout.readline().split()
    assert granted[0] == "granted", holder.stderr.read()
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)
        taker = client.acquire(SliceRequest(profile="3g.40gb"), timeout_s=5)
        assert taker.slice.id == granted[3] and taker.fence > int(granted[2])
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert holder.stdout.readline().strip() in ("lost expired", "lost gone")
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released False"
    assert client.allocator.lease(taker.lease_id).fence == taker.fence  # the new holder keeps it
    taker.release()
    holder.wait(10)


def _grants(client) -> int:
    return sum(e["type"] == "lease.granted" for e in client.allocator.events())


def test_holders_killed_at_random_never_cause_a_double_grant(client, redis_server, namespace):
    rng = random.Random(7)
    procs = [_worker(redis_server.url, namespace, "churn", "1g.10gb", "1", "400", stdin=subprocess.DEVNULL) for _ in range(6)]
    # at least 6 s of churn and 50 grants: on a loaded machine the workers' imports took most of a
    # fixed 6 s and the random kills left too few grants (29) to mean much. The kills leave two
    # workers churning; the loop below kills them too.
    deadline, cap = time.monotonic() + 6, time.monotonic() + 120
    killed = 0
    while time.monotonic() < cap and (time.monotonic() < deadline or _grants(client) <= 50):
        time.sleep(rng.uniform(0.2, 0.6))
        victim = rng.choice(procs)
        if victim.poll() is None and sum(p.poll() is None for p in procs) > 2:
            victim.send_signal(signal.SIGKILL)
            killed += 1
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    assert killed >= 3
    # Every holder is dead now: within lease TTL (1 s) + abandoned-wait TTL (1 s) + 1 s, every
    # slice is free again (a reaper runs, as the node agents do).
    deadline = time.monotonic() + 3.0 + 1.0  # 1 s of slack for a loaded CI machine
    while True:
        client.allocator.reap()
        states = {s["state"] for s in client.allocator.status()["slices"] if s["profile"] == "1g.10gb"}
        if states == {"free"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert states == {"free"}
    assert client.allocator.status()["queue"] == []
    report = check_events(client.allocator.events())
    assert report.violations == []
    assert report.grants > 50 and report.live == set()


def test_after_redis_loses_its_state_tokens_keep_growing_and_busy_slices_are_not_granted(
    fresh_redis_server, namespace, tmp_path
):
    from prefect_mig.agent import NodeAgent
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout

    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("H100-80GB", "3g.40gb@0 + 3g.40gb@4"))
        alloc = Allocator(fresh_redis_server.client(), namespace)
        agent = NodeAgent(backend, alloc, node="node-a")
        agent.publish()
        before = alloc.try_acquire(SliceRequest(profile="3g.40gb"))
        nvml.attach_process(before.slice.mig_uuid, pid=4321)  # the holder's work runs on it
        fresh_redis_server.client().flushall()  # Redis comes back empty
        fresh_redis_server.restart()
        alloc = Allocator(fresh_redis_server.client(), namespace)
        agent = NodeAgent(backend, alloc, node="node-a")
        agent.publish()  # nodes re-publish; the busy slice is not free
        states = {s["id"]: s["state"] for s in alloc.status()["slices"]}
        assert states[before.slice.id] == "unavailable"
        after = alloc.try_acquire(SliceRequest(profile="3g.40gb"))
        assert after.slice.id != before.slice.id and after.fence > before.fence
        with pytest.raises(LeaseLost):
            alloc.renew(before.lease_id, before.fence, 60)  # the old holder learns and stops
        nvml.detach_process(before.slice.mig_uuid, pid=4321)
        assert agent.tick() == "published"
        states = {s["id"]: s["state"] for s in alloc.status()["slices"]}
        assert states[before.slice.id] == "free"


def test_async_client_leases_and_a_cancelled_waiter_leaves_nothing_behind(redis_server, namespace):
    import asyncio

    from prefect_mig.allocator import AsyncLeaseClient

    client = AsyncLeaseClient(redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})

    async def scenario():
        async with client.lease(SliceRequest(profile="3g.40gb")) as held:
            waiter = asyncio.ensure_future(client.acquire(SliceRequest(profile="3g.40gb")))
            await asyncio.sleep(0.3)
            assert client.allocator.status()["queue"] != []
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            return held.slice.profile

    assert asyncio.run(scenario()) == "3g.40gb"
    status = client.allocator.status()
    assert status["queue"] == [] and status["leases"] == []


def test_async_waiters_beyond_the_event_loops_thread_pool_do_not_starve_the_holders(redis_server, namespace):
    """More async waiters than the loop's default executor has threads (6 on a 2-core machine)
    once held every thread, so a holder's release, which needs one, never ran: everyone waited
    until their timeout. Waits now run on threads of their own."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from prefect_mig.allocator import AsyncLeaseClient

    client = AsyncLeaseClient(redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
    served = []

    async def job(i):
        async with client.lease(SliceRequest(profile="7g.80gb", ttl_s=5), timeout_s=8):
            served.append(i)
            await asyncio.sleep(0.05)

    async def scenario():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))  # a small machine's pool
        began = time.monotonic()
        await asyncio.gather(*(job(i) for i in range(5)))
        return time.monotonic() - began

    took = asyncio.run(scenario())
    assert sorted(served) == [0, 1, 2, 3, 4] and took < 5, took
    assert client.allocator.status()["leases"] == []


def test_a_cancelled_async_wait_has_left_the_queue_when_the_cancelled_task_ends(redis_server, namespace):
    """A program that cancels its waiter and exits must not leave the request queued (to be
    granted, or to preempt a holder, for nobody until its wait TTL)."""
    import asyncio

    from prefect_mig.allocator import AsyncLeaseClient

    client = AsyncLeaseClient(redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
    held = client._sync.acquire(SliceRequest(profile="7g.80gb", ttl_s=30))

    async def scenario():
        waiter = asyncio.ensure_future(client.acquire(SliceRequest(profile="7g.80gb", priority=9)))
        await asyncio.sleep(0.5)
        assert client.allocator.status()["queue"] != []
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return client.allocator.status()["queue"]

    assert asyncio.run(scenario()) == []
    held.release()


def test_an_async_acquire_cancelled_at_any_moment_leaves_no_lease_behind(redis_server, namespace):
    """A cancellation landing while the grant came back, or while its first renewal ran, dropped
    the Lease, whose thread then renewed it for as long as the process lived."""
    import asyncio

    from prefect_mig.allocator import AsyncLeaseClient

    client = AsyncLeaseClient(redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})

    async def scenario():
        kept = []
        for k in range(40):
            task = asyncio.ensure_future(client.acquire(SliceRequest(profile="1g.10gb", ttl_s=2, holder=f"c{k}")))
            for _ in range(k % 8):
                await asyncio.sleep(0)
            await asyncio.sleep(0.0005 * (k // 8))
            task.cancel()
            try:
                kept.append(await task)
            except asyncio.CancelledError:
                pass
        for lease in kept:  # the ones the cancellation came too late for are the caller's
            await client.release(lease)
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    time.sleep(2.5)  # past the TTL: a lease nobody renews is gone, one a lost Lease renews is not
    client.allocator.reap()
    status = client.allocator.status()
    assert [row["holder"] for row in status["leases"]] == [] and status["queue"] == []


def test_a_held_lease_keeps_renewing_across_a_redis_restart(fresh_redis_server, namespace):
    client = LeaseClient(fresh_redis_server.url, namespace)
    client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    lease = client.acquire(SliceRequest(profile="3g.40gb", ttl_s=3))
    time.sleep(1.2)  # appendfsync everysec
    fresh_redis_server.restart()
    time.sleep(2.5)  # renewals at TTL/3 reconnect and go on
    assert not lease.lost.is_set()
    assert client.allocator.lease(lease.lease_id).fence == lease.fence
    assert lease.release() is True


def test_lease_client_from_settings_uses_the_configured_redis(redis_server, namespace, monkeypatch):
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    client = LeaseClient.from_settings()
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    with client.lease(SliceRequest(profile="4g.24gb")) as lease:
        assert lease.slice.profile == "4g.24gb"
    assert client.allocator.keys.namespace == namespace


def test_async_lease_client_from_settings_uses_the_configured_redis(redis_server, namespace, monkeypatch):
    """An asyncio program on the embedded default had no way to the generated URL and password."""
    import asyncio

    from prefect_mig.allocator import AsyncLeaseClient

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    client = AsyncLeaseClient.from_settings()
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})

    async def scenario():
        async with client.lease(SliceRequest(profile="4g.24gb"), timeout_s=10) as lease:
            return lease.slice.profile

    assert asyncio.run(scenario()) == "4g.24gb"
    assert client.allocator.keys.namespace == namespace and client.allocator.status()["leases"] == []


def test_lease_client_from_settings_on_the_embedded_default_shares_the_clis_redis(redis_server, tmp_path, monkeypatch):
    """No PREFECT_MIG_REDIS_URL: a plain process leases from the same private redis-server (random
    port, generated password) that `prefect-mig up`, the CLI and MigTaskRunner use."""
    from prefect_mig.allocator.embedded import ensure_embedded_redis, stop_embedded_redis
    from prefect_mig.cli.leases import _allocator

    monkeypatch.delenv("PREFECT_MIG_REDIS_URL", raising=False)
    monkeypatch.delenv("PREFECT_MIG_NAMESPACE", raising=False)
    monkeypatch.setenv("PREFECT_MIG_STATE_DIR", str(tmp_path))
    try:
        ensure_embedded_redis(tmp_path)  # as `prefect-mig up` leaves it running
        cli = _allocator()
        cli.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        with LeaseClient.from_settings().lease(SliceRequest(profile="4g.24gb"), timeout_s=30) as lease:
            assert [x["lease_id"] for x in cli.status()["leases"]] == [lease.lease_id]
        assert cli.status()["leases"] == []
    finally:
        stop_embedded_redis(tmp_path)
