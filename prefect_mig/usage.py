"""Usage and cost per tenant, GPU or profile, from the events stream and its hourly rollups.

The events stream keeps the newest ~100,000 transitions (``Allocator(events_maxlen=...)``). `roll_up`
folds the events past its cursor into one Redis hash per hour (``Keys.usage(hour)``), which nothing
trims, so reports cover weeks. It is safe to run from several processes at once (the cursor is
watched: a fold that raced another is retried on the new cursor). `report` rolls up first, then
sums the hours asked for. A lease counts in the hour it ended (released, expired); live leases are
not counted yet. Events trimmed before a roll-up read them are lost: run `prefect-mig report`
(or `roll_up`) more often than the stream turns over.

Figures per row: slice-hours leased, compute-slice-hours, GPU-hours (compute slices over the GPU's
count: a 3g lease on an H100 is 3/7 of it), leases ended, mean and p95 wait (p95 is the upper bound of
the wait histogram's bucket), preemptions (revocations of the row's leases), cost (GPU-hours x price).

Examples:
    ```python
    from prefect_mig.allocator import Allocator, ManualClock, SliceRequest
    from prefect_mig.testing.redis_server import RedisServer
    from prefect_mig.usage import report

    with RedisServer() as server:
        clock = ManualClock()
        alloc = Allocator(server.client(), "doc", clock=clock)
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        lease = alloc.acquire(SliceRequest(profile="4g.24gb", tenant="team-a"), timeout_s=0)
        clock.advance(1800)
        alloc.release(lease.lease_id, lease.fence)
        row = report(alloc, since_s=86400, by="tenant", price_per_gpu_hour=2.0)["rows"][0]
        assert (row["key"], row["slice_hours"], row["gpu_hours"], row["cost"]) == ("team-a", 0.5, 0.5, 1.0)
    ```
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import redis

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.allocator import redis_errors
from prefect_mig.allocator.models import decode
from prefect_mig.metrics import BUCKETS_MS

By = Literal["tenant", "gpu", "profile"]
HOUR_MS = 3_600_000
_DIMENSIONS = ("tenant", "gpu", "profile")


def _slice_labels(alloc: Allocator) -> dict[str, tuple[str, str, int]]:
    """slice id -> (gpu "node/index", profile, the GPU model's compute slices)."""
    import json

    from prefect_mig.model import get_model

    out = {}
    for sid, raw in alloc.redis.hgetall(alloc.keys.slices).items():
        s = json.loads(decode(raw))
        out[decode(sid)] = (f"{s['node']}/{s['gpu_index']}", s["profile"], get_model(s["gpu_model"]).compute_slices)
    return out


def _bucket(ms: int) -> int:
    return next((i for i, bound in enumerate(BUCKETS_MS, start=1) if ms <= bound), len(BUCKETS_MS) + 1)


def roll_up(alloc: Allocator, *, batch: int = 10_000) -> int:
    """Fold the events past the cursor into hourly hashes; returns how many events were folded."""
    k = alloc.keys
    folded = 0
    with redis_errors("roll up usage"):
        labels = _slice_labels(alloc)
        while True:
            with alloc.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(k.usage_cursor)
                    cursor = decode(pipe.get(k.usage_cursor) or b"0-0")
                    entries = pipe.xrange(k.events, min=f"({cursor}", count=batch)
                    if not entries:
                        return folded
                    incr = _aggregate(entries, labels)
                    pipe.multi()
                    for (hour, field), n in incr.items():
                        pipe.hincrby(k.usage(hour), field, n)
                        pipe.zadd(k.usage_hours, {str(hour): hour})
                    pipe.set(k.usage_cursor, decode(entries[-1][0]))
                    pipe.execute()
                    folded += len(entries)
                except redis.WatchError:
                    continue


def _aggregate(entries, labels) -> dict[tuple[int, str], int]:  # noqa: ANN001
    incr: dict[tuple[int, str], int] = defaultdict(int)
    for _, raw in entries:
        e = {decode(a): decode(b) for a, b in raw.items()}
        kind, at = e.get("type", ""), int(e.get("at", 0) or 0)
        hour = at - at % HOUR_MS
        if kind == "lease.granted":
            dims = _dims(e.get("tenant", "default"), e.get("slice", ""), labels, e.get("pkey", ""))
            waited = int(e.get("waited_ms", 0) or 0)
            for dim in dims:
                incr[(hour, f"{dim}|wait_ms")] += waited
                incr[(hour, f"{dim}|waits")] += 1
                incr[(hour, f"{dim}|wait:{_bucket(waited)}")] += 1
        elif kind in ("lease.released", "lease.expired") and e.get("held_ms"):
            sid = e.get("slice", "")
            held, compute = int(e["held_ms"]), int(e.get("compute") or 0)
            total = labels.get(sid, ("", "", 7))[2]
            for dim in _dims(e.get("tenant") or "default", sid, labels):
                incr[(hour, f"{dim}|leased_ms")] += held
                incr[(hour, f"{dim}|compute_ms")] += held * compute
                incr[(hour, f"{dim}|gpu_ms_x{total}")] += held * compute
                incr[(hour, f"{dim}|leases")] += 1
        elif kind == "lease.revoked":  # charged to the revoked lease's tenant (the event names it)
            for dim in _dims(e.get("tenant") or "unknown", e.get("slice", ""), labels):
                incr[(hour, f"{dim}|preemptions")] += 1
    return incr


def _dims(tenant: str, slice_id: str, labels, pkey: str = "") -> list[str]:  # noqa: ANN001
    gpu, profile, _ = labels.get(slice_id, ("unknown", pkey.split("/")[-1] or "unknown", 7))
    return [f"tenant={tenant}", f"gpu={gpu}", f"profile={profile}", "all=all"]


def report(
    alloc: Allocator, *, since_s: float, by: By = "tenant", price_per_gpu_hour: float = 0.0
) -> dict[str, Any]:
    """Usage per `by` over the last `since_s` seconds (whole hours), after a roll-up."""
    if by not in _DIMENSIONS:
        from prefect_mig.errors import ConfigError

        raise ConfigError(f"by={by!r}: must be one of {', '.join(_DIMENSIONS)}.", field="by", value=by)
    roll_up(alloc)
    now = alloc.now_ms()
    start = now - int(since_s * 1000)
    start -= start % HOUR_MS
    k = alloc.keys
    with redis_errors("read usage"):
        hours = [int(decode(h)) for h in alloc.redis.zrangebyscore(k.usage_hours, start, now)]
        pipe = alloc.redis.pipeline(transaction=False)
        for h in hours:
            pipe.hgetall(k.usage(h))
        sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for fields in pipe.execute() if hours else []:
            for f, v in fields.items():
                dim, _, metric = decode(f).partition("|")
                name, _, value = dim.partition("=")
                if name == by:
                    sums[value][metric] += int(decode(v))
    rows = [_row(key, m, price_per_gpu_hour) for key, m in sorted(sums.items())]
    return {"since_ms": start, "until_ms": now, "by": by, "price_per_gpu_hour": price_per_gpu_hour,
            "rows": rows}


def _row(key: str, m: dict[str, int], price: float) -> dict[str, Any]:
    gpu_ms = sum(v / int(f.removeprefix("gpu_ms_x")) for f, v in m.items() if f.startswith("gpu_ms_x"))
    waits = m.get("waits", 0)
    p95 = None
    if waits:
        need, seen = 0.95 * waits, 0
        for i, bound in enumerate((*BUCKETS_MS, None), start=1):
            seen += m.get(f"wait:{i}", 0)
            if seen >= need:
                p95 = None if bound is None else bound / 1000
                break
    return {
        "key": key,
        "slice_hours": round(m.get("leased_ms", 0) / HOUR_MS, 6),
        "compute_slice_hours": round(m.get("compute_ms", 0) / HOUR_MS, 6),
        "gpu_hours": round(gpu_ms / HOUR_MS, 6),
        "leases": m.get("leases", 0),
        "mean_wait_s": round(m.get("wait_ms", 0) / waits / 1000, 3) if waits else None,
        "p95_wait_s_at_most": p95,
        "preemptions": m.get("preemptions", 0),
        "cost": round(gpu_ms / HOUR_MS * price, 4),
    }
