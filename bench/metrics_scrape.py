"""Metrics scrape benchmark: does scraping a 1,000-GPU cluster slow the allocator?

One redis-server, one namespace with 1,000 H100s carved 7 x 1g.10gb (7,000 slices, half of them
leased, 200 requests queued). The anchor is the allocator benchmark's single-client
acquire+release loop (`bench/allocator.py`'s ``cycles_per_s``) on that same inventory, without any
scrape; the same loop then runs while another process scrapes the cluster's metrics (the exporter's
own code, `prefect_mig.metrics.render`) every ``--interval`` seconds, and while it scrapes back to
back (the worst case, far above any Prometheus scrape rate). Rounds alternate, medians compared,
so machine noise hits all alike.

Usage: ``.venv/bin/python bench/metrics_scrape.py [--quick] [--interval 5]``. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefect_mig.allocator import Allocator, SliceRequest  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

console = Console()
SEVEN = " + ".join(f"1g.10gb@{i}" for i in range(7))
GPUS = 1000


def build(url: str, ns: str) -> int:
    """Publish 1,000 GPUs, lease half their slices, queue 200 requests for another kind; slices."""
    import redis

    alloc = Allocator(redis.Redis.from_url(url), ns, wait_ttl_s=3600, max_ttl_s=86_400, queue_uncarved=True)
    nodes, layouts = [], {}
    for i in range(GPUS // 16 + 1):
        n = min(16, GPUS - i * 16)
        if n <= 0:
            break
        nodes.append(f"n{i}={n}xH100-80GB")
        layouts[f"n{i}"] = [SEVEN] * n
    slices = alloc.publish_fleet(",".join(nodes), layouts=layouts, heartbeat_ttl_s=86_400)
    for i in range(len(slices) // 2):
        alloc.try_acquire(SliceRequest(profile="1g.10gb", tenant=f"team-{i % 5}", ttl_s=86_400))
    for i in range(200):
        alloc.try_acquire(SliceRequest(profile="7g.80gb", priority=i % 100, tenant=f"team-{i % 5}"), wait=True)
    return len(slices)


def scraper(url: str, ns: str, interval_s: float, mode, stop, out) -> None:  # noqa: ANN001
    """Render the metrics whenever `mode` says so: 1 = every `interval_s`, 2 = back to back."""
    import redis

    from prefect_mig.metrics import registry_for, render

    alloc = Allocator(redis.Redis.from_url(url), ns)
    registry = registry_for(alloc)
    durations, size = [], 0
    while not stop.is_set():
        if mode.value == 0:
            time.sleep(0.01)
            continue
        t0 = time.perf_counter()
        size = len(render(alloc, registry))
        durations.append(time.perf_counter() - t0)
        if mode.value == 1:
            time.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))
    out.put((durations, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds (about a minute)")
    parser.add_argument(
        "--interval", type=float, default=5.0,
        help="seconds between scrapes, and the length of a round (Prometheus scrapes every 15 to 60 s)",
    )
    args = parser.parse_args()
    rounds, per = (3, args.interval) if args.quick else (8, args.interval)
    import redis

    with RedisServer() as server:
        ns = "scrape-" + uuid.uuid4().hex[:6]
        t0 = time.perf_counter()
        n_slices = build(server.url, ns)
        console.print(f"redis-server on {server.url}; {n_slices} slices published in {time.perf_counter() - t0:.0f} s")
        alloc = Allocator(redis.Redis.from_url(server.url), ns)
        req = SliceRequest(profile="1g.10gb")

        def cycles(seconds: float) -> float:
            n, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                lease = alloc.try_acquire(req)
                alloc.release(lease.lease_id, lease.fence)
                n += 1
            return n / seconds

        mode, stop, out = mp.Value("i", 0), mp.Event(), mp.Queue()
        proc = mp.Process(target=scraper, args=(server.url, ns, args.interval, mode, stop, out))
        proc.start()
        cycles(0.5)
        figures: dict[str, list[float]] = {"none": [], "interval": [], "continuous": []}
        for _ in range(rounds):
            for name, value in (("none", 0), ("interval", 1), ("continuous", 2)):
                mode.value = value
                time.sleep(0.05)
                figures[name].append(cycles(per))
        mode.value = 0
        stop.set()
        durations, size = out.get(timeout=60)
        proc.join(timeout=60)
    base = statistics.median(figures["none"])
    at_interval = statistics.median(figures["interval"])
    continuous = statistics.median(figures["continuous"])
    scrape_p50 = statistics.median(durations)
    result = {
        "gpus": GPUS,
        "slices": n_slices,
        "scrape_interval_s": args.interval,
        "cycles_per_s": round(base, 1),
        "cycles_per_s_scraped": round(at_interval, 1),
        "ratio_scraped_vs_none": round(at_interval / base, 3),
        "cycles_per_s_scraped_back_to_back": round(continuous, 1),
        "ratio_back_to_back_vs_none": round(continuous / base, 3),
        "scrape_p50_s": round(scrape_p50, 4),
        "scrape_bytes": size,
        "target_ratio_min": 0.95,
    }
    table = Table(title=f"metrics scrape vs allocator cycles, {GPUS} GPUs / {n_slices} slices (one run)")
    for col in ("allocator loop", "cycles/s (median)", "ratio vs no scrape"):
        table.add_column(col)
    table.add_row("no scrape (anchor)", f"{base:,.0f}", "1.000")
    table.add_row(f"scrape every {args.interval:g} s", f"{at_interval:,.0f}", f"{at_interval / base:.3f} (target >= 0.95)")
    table.add_row("scrape back to back", f"{continuous:,.0f}", f"{continuous / base:.3f}")
    console.print(table)
    console.print(f"one scrape: p50 {scrape_p50 * 1000:.0f} ms, {size:,} bytes of text")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
