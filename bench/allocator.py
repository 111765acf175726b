"""Allocator benchmark: our leases against a bare Redis lock and Prefect's concurrency limits.

All figures come from one run against the same private redis-server:

- cycles/s of single-client acquire+release: ours, redis-py ``Lock`` (a bare mutex: the floor),
  and Prefect's ``concurrency()`` global limit against a local (ephemeral) Prefect API;
- release-to-next-waiter hand-off latency (waiter in another process, blocked on its key);
- aggregate grants/s of 8 processes;
- acquire p99 with 1,000 GPUs x 7 slices and 10,000 queued requests, next to a small inventory.

Usage: ``.venv/bin/python bench/allocator.py [--quick]``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

console = Console()
SEVEN = " + ".join(f"1g.10gb@{i}" for i in range(7))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def cycles(url: str, seconds: float, rounds: int = 6) -> tuple[float, float]:
    """(ours, redis Lock) acquire+release cycles per second: alternating short rounds, median of
    each, so that machine noise hits both alike."""
    import redis

    alloc = Allocator(redis.Redis.from_url(url), "bench-" + uuid.uuid4().hex[:6])
    alloc.publish_fleet("n=1xH100-80GB", layouts={"n": [SEVEN]})
    req = SliceRequest(profile="1g.10gb")
    lock = redis.Redis.from_url(url).lock("bench-lock-" + uuid.uuid4().hex[:6], timeout=60)

    def ours(end: float) -> int:
        n = 0
        while time.perf_counter() < end:
            lease = alloc.try_acquire(req)
            alloc.release(lease.lease_id, lease.fence)
            n += 1
        return n

    def floor(end: float) -> int:
        n = 0
        while time.perf_counter() < end:
            lock.acquire()
            lock.release()
            n += 1
        return n

    ours(time.perf_counter() + 0.3)
    floor(time.perf_counter() + 0.3)
    per = seconds / rounds
    a, b = [], []
    for _ in range(rounds):
        a.append(ours(time.perf_counter() + per) / per)
        b.append(floor(time.perf_counter() + per) / per)
    return statistics.median(a), statistics.median(b)


def prefect_cycles(seconds: float) -> float:
    """Prefect's global concurrency limit, acquire+release, against a local ephemeral API."""
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_API_URL": "",
            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
            "PREFECT_LOGGING_LEVEL": "ERROR",
            "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
        }
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-bench", limit=7))
    with concurrency("gpu-bench", occupy=1):  # warm up: the ephemeral API starts here
        pass
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        with concurrency("gpu-bench", occupy=1):
            pass
        n += 1
    return n / seconds


def _handoff_waiter(url, ns, request_ids, out):
    import redis

    alloc = Allocator(redis.Redis.from_url(url), ns)
    for rid in request_ids:
        lease = alloc.wait_for_grant(rid, 30, request=SliceRequest(profile="4g.24gb"))
        out.put(time.monotonic())
        alloc.release(lease.lease_id, lease.fence)


def handoff(url: str, rounds: int) -> tuple[float, float]:
    import redis

    ns = "hand-" + uuid.uuid4().hex[:6]
    alloc = Allocator(redis.Redis.from_url(url), ns)
    alloc.publish_fleet("n=1xA30-24GB", layouts={"n": ["4g.24gb@0"]})
    req = SliceRequest(profile="4g.24gb")
    lats = []
    out: mp.Queue = mp.Queue()
    for _ in range(rounds):
        held = alloc.try_acquire(req)
        queued = alloc.try_acquire(req, wait=True)
        proc = mp.Process(target=_handoff_waiter, args=(url, ns, [queued.request_id], out))
        proc.start()
        time.sleep(0.02)  # let the waiter block on its key
        t0 = time.monotonic()
        alloc.release(held.lease_id, held.fence)
        lats.append((out.get(timeout=30) - t0) * 1000)
        proc.join()
    return pct(lats, 50), pct(lats, 99)


def _churn(url, ns, seconds, out):
    import redis

    alloc = Allocator(redis.Redis.from_url(url), ns)
    req = SliceRequest(profile="1g.10gb")
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        lease = alloc.acquire(req, timeout_s=10)
        alloc.release(lease.lease_id, lease.fence)
        n += 1
    out.put(n)


def aggregate(url: str, seconds: float, procs: int = 8) -> float:
    import redis

    ns = "agg-" + uuid.uuid4().hex[:6]
    Allocator(redis.Redis.from_url(url), ns).publish_fleet("n=2xH100-80GB", layouts={"n": [SEVEN, SEVEN]})
    out: mp.Queue = mp.Queue()
    workers = [mp.Process(target=_churn, args=(url, ns, seconds, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    total = sum(out.get(timeout=seconds + 60) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def acquire_p99(url: str, *, gpus: int, queued: int, samples: int) -> float:
    """p99 of one acquire (release not timed) with `gpus` GPUs (7 slices each) and `queued` waiters."""
    import redis

    ns = "scale-" + uuid.uuid4().hex[:6]
    alloc = Allocator(redis.Redis.from_url(url), ns, wait_ttl_s=3600)
    big = max(1, gpus // 10)  # a tenth carved 3g + 3g, all leased, with the queue waiting on them
    per_node = 16
    nodes, layouts, left, i = [], {}, gpus, 0
    while left > 0:
        n = min(per_node, left)
        name = f"n{i}"
        nodes.append(f"{name}={n}xH100-80GB")
        layouts[name] = [("3g.40gb@0 + 3g.40gb@4" if (i * per_node + g) < big else SEVEN) for g in range(n)]
        left -= n
        i += 1
    alloc.publish_fleet(",".join(nodes), layouts=layouts)
    three = SliceRequest(profile="3g.40gb")
    for _ in range(big * 2):
        alloc.try_acquire(three)
    for _ in range(queued):
        alloc.try_acquire(three, wait=True)
    one = SliceRequest(profile="1g.10gb")
    lats = []
    for _ in range(samples):
        t0 = time.perf_counter()
        lease = alloc.try_acquire(one)
        lats.append((time.perf_counter() - t0) * 1000)
        assert isinstance(lease, LeaseInfo)
        alloc.release(lease.lease_id, lease.fence)
    return pct(lats, 99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    args = parser.parse_args()
    secs = 2.0 if args.quick else 5.0
    with RedisServer() as server:
        url = server.url
        console.print(f"redis-server on {url}; {'quick' if args.quick else 'full'} run")
        ours, lock = cycles(url, 2 * secs)
        pref = prefect_cycles(secs)
        p50, p99 = handoff(url, 30 if args.quick else 100)
        agg = aggregate(url, secs)
        small = acquire_p99(url, gpus=2, queued=0, samples=300 if args.quick else 1000)
        scale = acquire_p99(url, gpus=1000, queued=10_000, samples=300 if args.quick else 1000)
    figures = {
        "cycles_per_s": round(ours, 1),
        "redis_lock_cycles_per_s": round(lock, 1),
        "prefect_concurrency_cycles_per_s": round(pref, 1),
        "handoff_p50_ms": round(p50, 3),
        "handoff_p99_ms": round(p99, 3),
        "aggregate_grants_per_s": round(agg, 1),
        "small_acquire_p99_ms": round(small, 3),
        "scale_acquire_p99_ms": round(scale, 3),
    }
    table = Table(title="allocator benchmark (one run, one redis-server)")
    for col in ("figure", "value", "anchor / target", "ratio"):
        table.add_column(col)
    table.add_row("our acquire+release /s", f"{ours:,.0f}", "", "")
    table.add_row("redis-py Lock /s (floor)", f"{lock:,.0f}", "ours >= 0.7x", f"{ours / lock:.2f}x")
    table.add_row("Prefect concurrency() /s", f"{pref:,.1f}", "ours >= 200x", f"{ours / pref:,.0f}x")
    table.add_row("hand-off p50 / p99 ms", f"{p50:.2f} / {p99:.2f}", "p99 <= 5 ms", "")
    table.add_row("8 processes, grants /s", f"{agg:,.0f}", "", "")
    table.add_row("acquire p99 ms, 2 GPUs", f"{small:.3f}", "", "")
    table.add_row("acquire p99 ms, 1000 GPUs + 10k queued", f"{scale:.3f}", "<= 2x small", f"{scale / small:.2f}x")
    console.print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
