"""Finding 1 and 7: the renew thread meets every kind of Redis error. A holder that can no longer
prove its lease alive is told (on_lost) before the lease could expire on the server, so the slice is
never granted while it still runs; a renewal that worked brings the rate back to TTL/3."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from prefect_mig.allocator import SliceRequest
from prefect_mig.testing.holder_log import HolderLog
from prefect_mig.testing.redis_server import RedisServer

from .helpers import Holder, cluster, paused, wait_until

REQUEST = SliceRequest(profile="4g.24gb", ttl_s=2)


def _out_of_memory(client: redis.Redis) -> None:
    """Put the server over its maxmemory (noeviction): every write is refused with OOM."""
    for i in range(20):
        client.set(f"filler:{i}", b"x" * 200_000)
    client.config_set("maxmemory", client.info("memory")["used_memory"] // 2)
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        client.set("probe", "x")


def _memory_back(client: redis.Redis) -> None:
    client.config_set("maxmemory", 0)
    client.delete(*[f"filler:{i}" for i in range(20)])


def _expires_at(client, c, lease_id) -> int:
    return int(c.hget(client.allocator.keys.lease(lease_id), "expires_at"))


def _next_holder_starts_after(client, log, first: Holder) -> None:
    second = Holder(client, log, REQUEST, timeout_s=15)
    second.stop()
    first.stop()
    assert second.lease.slice.id == first.lease.slice.id
    assert log.overlaps() == []


def test_oom_in_renewal_stops_the_holder_before_the_lease_can_expire():
    with RedisServer() as server:
        client, log, c = cluster(server), HolderLog(), server.client()
        holder = Holder(client, log, REQUEST)
        _out_of_memory(c)
        assert holder.lost.wait(4), "on_lost never fired: the renew thread died on the OOM error"
        assert holder.lost_at * 1000 < _expires_at(client, c, holder.lease.lease_id)
        assert "maxmemory" in str(holder.error)
        _memory_back(c)
        _next_holder_starts_after(client, log, holder)


def test_busy_server_in_renewal_stops_the_holder_before_the_lease_can_expire():
    with RedisServer(extra_args=["--busy-reply-threshold", "100"]) as server:
        client, log, c = cluster(server), HolderLog(), server.client()
        holder = Holder(client, log, REQUEST)
        blocker = threading.Thread(
            target=lambda: pytest.raises(redis.ResponseError, server.client().eval, "while true do end", 0), daemon=True
        )
        blocker.start()
        try:
            assert holder.lost.wait(4), "on_lost never fired: the renew thread died on BUSY"
        finally:
            wait_until(lambda: _script_kill(server), 10, "SCRIPT KILL")
            blocker.join(10)
        assert holder.lost_at * 1000 < _expires_at(client, c, holder.lease.lease_id)
        _next_holder_starts_after(client, log, holder)


def _script_kill(server) -> bool:
    try:
        server.client().script_kill()
        return True
    except redis.ResponseError as exc:
        return "NOTBUSY" in str(exc)


def test_readonly_replica_in_renewal_stops_the_holder():
    with RedisServer() as server, RedisServer() as primary:
        client, log = cluster(server), HolderLog()
        holder = Holder(client, log, REQUEST)
        server.client().replicaof("127.0.0.1", primary.port)  # a failover turned our server into a replica
        try:
            assert holder.lost.wait(4), "on_lost never fired after the server became a read-only replica"
        finally:
            server.client().replicaof("NO", "ONE")
        holder.stop()


def test_a_paused_server_stops_the_holder_before_the_lease_can_expire():
    with RedisServer() as server:
        client, log, c = cluster(server), HolderLog(), server.client()
        holder = Holder(client, log, REQUEST)
        expires = _expires_at(client, c, holder.lease.lease_id)
        with paused(server):
            assert holder.lost.wait(4)
            # the lease can only have been renewed later than we read it, never shortened
            assert holder.lost_at * 1000 < expires + 2000
            renewed = holder.lost_at * 1000 < expires
        assert renewed or holder.lost_at * 1000 < _expires_at(client, c, holder.lease.lease_id)
        _next_holder_starts_after(client, log, holder)


def test_renewal_returns_to_ttl_over_3_after_an_outage():
    with RedisServer() as server:
        client = cluster(server)
        lease = client.acquire(SliceRequest(profile="4g.24gb", ttl_s=12))  # renewals every 4 s
        time.sleep(3.0)
        server.kill()  # renewals from 4 s on fail at once (connection refused) and are retried sooner
        time.sleep(4.0)
        server.start()  # same port, AOF replayed: the lease is still there
        time.sleep(2.5)  # a retry succeeded
        c = server.client()
        before = c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        time.sleep(7.5)  # at TTL/3 = 4 s: at most two renewals
        after = c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        assert not lease.lost.is_set()
        assert after - before <= 2, f"{after - before} renewals in 7.5 s at TTL 12 s"
        lease.release()
