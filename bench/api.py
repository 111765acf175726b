"""HTTP lease API benchmark: renew latency with many clients waiting on the API, against none.

One run, one private redis-server, one ``prefect-mig api serve`` process (uvicorn, one worker):

1. renew p50/p99 of a held lease with nobody waiting (the anchor);
2. N clients each POST an acquire for the same busy slice and wait (default 1,000; one connection
   each, held open), and the same renew is measured again while they wait;
3. the API server's CPU use while they wait and nothing else happens (what keeping N waits alive
   costs it: from /proc, over ``--idle-s`` seconds).

Before waits were async, each waiting acquire held one of the server's 40 threads, so renew queued
behind them (the issue measured 9.7 s with 45 waiters).

Usage: ``.venv/bin/python bench/api.py [--waiters 1000] [--renews 300] [--idle-s 10]``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefect_mig.allocator import Allocator  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

TOKEN = "bench-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def renews(http: httpx.AsyncClient, lease: dict, count: int) -> list[float]:
    took = []
    for _ in range(count):
        start = time.perf_counter()
        reply = await http.post(f"/v1/leases/{lease['lease_id']}/renew", json={"fence": lease["fence"], "ttl_s": 600})
        took.append((time.perf_counter() - start) * 1000)
        assert reply.status_code == 200, reply.text
    return took


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def measure(
    url: str, alloc: Allocator, waiters: int, count: int, server_pid: int, idle_s: float
) -> tuple[list[float], list[float], float]:
    limits = httpx.Limits(max_connections=waiters + 10, max_keepalive_connections=waiters + 10)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600, limits=limits) as http:
        lease = (await http.post("/v1/leases", json={"request": {"profile": "7g.80gb", "ttl_s": 600}})).json()
        await renews(http, lease, 20)  # warm up
        idle = await renews(http, lease, count)
        wait_body = {"request": {"profile": "7g.80gb"}, "timeout_s": 600}
        pending = [asyncio.ensure_future(http.post("/v1/leases", json=wait_body)) for _ in range(waiters)]
        deadline = time.monotonic() + 300
        while len(alloc.status()["queue"]) < waiters:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(alloc.status()['queue'])} of {waiters} acquires queued within 300 s")
            await asyncio.sleep(0.2)
        loaded = await renews(http, lease, count)
        before, started = cpu_s(server_pid), time.monotonic()
        await asyncio.sleep(idle_s)
        cpu_share = (cpu_s(server_pid) - before) / (time.monotonic() - started)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return idle, loaded, cpu_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--renews", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=10.0, help="how long the server's CPU use is sampled")
    args = parser.parse_args()
    with RedisServer() as server:
        alloc = Allocator(server.client(), "bench-api")
        alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PREFECT_MIG_REDIS_URL": server.url, "PREFECT_MIG_NAMESPACE": "bench-api",
               "PREFECT_MIG_API_TOKEN": TOKEN, "PREFECT_MIG_API_MAX_WAIT_S": "600"}
        api = subprocess.Popen(
            [sys.executable, "-m", "prefect_mig.cli.main", "api", "serve", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/v1/status", headers=AUTH, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            idle, loaded, cpu_share = asyncio.run(measure(url, alloc, args.waiters, args.renews, api.pid, args.idle_s))
        finally:
            api.terminate()
            api.wait(30)
    p50_idle, p99_idle, p50_loaded, p99_loaded = pct(idle, 50), pct(idle, 99), pct(loaded, 50), pct(loaded, 99)
    table = Table(title=f"HTTP renew latency (ms), one run, {args.renews} renews each")
    for col in ("case", "p50", "p99", "p99 / no-waiter p99"):
        table.add_column(col)
    table.add_row("no waiters (anchor)", f"{p50_idle:.2f}", f"{p99_idle:.2f}", "1.00x")
    table.add_row(f"{args.waiters} clients waiting", f"{p50_loaded:.2f}", f"{p99_loaded:.2f}", f"{p99_loaded / p99_idle:.2f}x")
    Console().print(table)
    print(f"API server CPU while {args.waiters} clients wait: {cpu_share * 100:.1f} % of one core")
    print(json.dumps({
        "bench": "api_renew_under_waiters", "waiters": args.waiters, "renews": args.renews,
        "renew_p50_ms_idle": round(p50_idle, 3), "renew_p99_ms_idle": round(p99_idle, 3),
        "renew_p50_ms_waiters": round(p50_loaded, 3), "renew_p99_ms_waiters": round(p99_loaded, 3),
        "p99_ratio": round(p99_loaded / p99_idle, 3), "server_cpu_share_waiting": round(cpu_share, 4),
    }))


if __name__ == "__main__":
    main()
