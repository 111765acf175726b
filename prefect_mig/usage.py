"""Usage and cost per tenant, GPU or profile, from the events stream and its hourly rollups.

The events stream keeps the newest ~100,000 transitions (``Allocator(events_maxlen=...)``). `roll_up`
folds the events past its cursor into one Redis hash per hour (``Keys.usage(hour)``), which nothing
trims, so reports cover weeks. It is safe to run from several processes at once (the cursor is
watched: a fold that raced another is retried on the new cursor). `report` rolls up first, then
sums the hours asked for. A lease's slice time counts in the hours it was held, once it ended
(released, expired): live leases are not counted yet; the lease itself (``leases``) counts in the
hour it ended, its wait in the hour it was granted. A lease counts for the GPU and profile its slice
had (the lease's end event names them), also once that GPU was re-carved. Events trimmed before a roll-up read them are
lost: run `prefect-mig report` (or `roll_up`) more often than the stream turns over.

Figures per row: slice-hours leased, compute-slice-hours, GPU-hours (compute slices over the GPU's
count: a 3g lease on an H100 is 3/7 of it), leases ended, mean and p95 wait (p95 is the upper bound of
the wait histogram's bucket), preemptions (the row's leases taken back for a request of higher priority),
admin revocations (taken back by `prefect-mig lease revoke` / `Allocator.revoke`), cost (GPU-hours x price).

Idle slice-hours (rows by GPU or profile, and the cluster's ``totals``): carved slice-hours minus
leased slice-hours. A slice is carved from the publish that first lists it (``inventory.published``
names the slices it adds and drops) until the publish that drops it; a slice still carved counts up
to now. So idle time is time a slice existed in the inventory with no lease on it, whether it was
free or out of service (its node silent, its GPU draining, quarantined): capacity nobody used. A
tenant has no idle time. Where the events of a re-carve were trimmed before any roll-up read them,
the next roll-up matches the carved set to the inventory: a slice it no longer finds counts until
then, one it finds unseen counts from then (what happened in between is not known). A slice leased
past its dropping (NVML lost it while leased) counts as leased but no longer as carved; per row,
idle is never below 0.

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

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Literal

import redis

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.models import decode
from prefect_mig.metrics import BUCKETS_MS

By = Literal["tenant", "gpu", "profile"]
HOUR_MS = 3_600_000
_DIMENSIONS = ("tenant", "gpu", "profile")


def _slice_labels(alloc: Allocator) -> dict[str, tuple[str, str, int, bool]]:
    """slice id -> (gpu "node/index", profile, the GPU model's compute slices, left out of its node's
    last publish)."""
    from prefect_mig.model import get_model

    out = {}
    for sid, raw in alloc.redis.hgetall(alloc.keys.slices).items():
        s = json.loads(decode(raw))
        out[decode(sid)] = (f"{s['node']}/{s['gpu_index']}", s["profile"], get_model(s["gpu_model"]).compute_slices,
                            bool(s.get("gone")))
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
                    pipe.watch(k.usage_cursor, k.usage_carved)
                    cursor = decode(pipe.get(k.usage_cursor) or b"0-0")
                    entries = pipe.xrange(k.events, min=f"({cursor}", count=batch)
                    carved = {decode(sid): json.loads(decode(v)) for sid, v in pipe.hgetall(k.usage_carved).items()}
                    if not entries:
                        _reconcile_carved(pipe, k, carved, labels, alloc.now_ms())
                        return folded
                    before = dict(carved)
                    incr = _aggregate(entries, labels, carved)
                    pipe.multi()
                    _add_to_hours(pipe, k, incr)
                    if gone := [sid for sid in before if sid not in carved]:
                        pipe.hdel(k.usage_carved, *gone)
                    if new := {sid: json.dumps(v) for sid, v in carved.items() if sid not in before}:
                        pipe.hset(k.usage_carved, mapping=new)
                    pipe.set(k.usage_cursor, decode(entries[-1][0]))
                    pipe.execute()
                    folded += len(entries)
                except redis.WatchError:
                    continue


def _reconcile_carved(pipe, k, carved: dict, labels, now_ms: int) -> None:  # noqa: ANN001
    """Match the carved slices to the inventory once every event is folded. One whose publish no
    roll-up saw (trimmed before it was read, or published before this version) counts from now
    (since when is unknown); one gone without a publish a roll-up saw counts until now."""
    unseen = {sid: json.dumps([now_ms, gpu, profile]) for sid, (gpu, profile, _, gone) in labels.items()
              if sid not in carved and not gone}
    vanished = [sid for sid in carved if sid not in labels or labels[sid][3]]
    if not unseen and not vanished:
        return
    incr: dict[tuple[int, str], int] = defaultdict(int)
    for sid in vanished:
        since, gpu, profile = carved[sid]
        _credit_carved(incr, since, now_ms, gpu, profile)
    pipe.multi()
    _add_to_hours(pipe, k, incr)
    if vanished:
        pipe.hdel(k.usage_carved, *vanished)
    if unseen:
        pipe.hset(k.usage_carved, mapping=unseen)
    pipe.execute()


def _add_to_hours(pipe, k, incr: dict[tuple[int, str], int]) -> None:  # noqa: ANN001
    """Queue the hourly increments on `pipe` (in MULTI), each hour listed in ``usage_hours``."""
    for (hour, field), n in incr.items():
        pipe.hincrby(k.usage(hour), field, n)
        pipe.zadd(k.usage_hours, {str(hour): hour})


def _hours_of(start_ms: int, end_ms: int) -> Iterator[tuple[int, int]]:
    """(hour, ms of [start_ms, end_ms) in it) for each hour the span touches."""
    at = start_ms
    while at < end_ms:
        hour = at - at % HOUR_MS
        upto = min(end_ms, hour + HOUR_MS)
        yield hour, upto - at
        at = upto


def _aggregate(entries, labels, carved: dict) -> dict[tuple[int, str], int]:  # noqa: ANN001
    """The hourly increments of `entries`; `carved` (slice id -> [since, gpu, profile]) is updated
    with the slices they carve, and a gone slice's carved time is credited to the hours it spans."""
    incr: dict[tuple[int, str], int] = defaultdict(int)
    for _, raw in entries:
        e = {decode(a): decode(b) for a, b in raw.items()}
        kind, at = e.get("type", ""), int(e.get("at", 0) or 0)
        hour = at - at % HOUR_MS
        if kind == "lease.granted":
            dims = _dims(e.get("tenant", "default"), _where(e, labels, carved)[:2])
            waited = int(e.get("waited_ms", 0) or 0)
            for dim in dims:
                incr[(hour, f"{dim}|wait_ms")] += waited
                incr[(hour, f"{dim}|waits")] += 1
                incr[(hour, f"{dim}|wait:{_bucket(waited)}")] += 1
        elif kind in ("lease.released", "lease.expired") and e.get("held_ms"):
            held, compute = int(e["held_ms"]), int(e.get("compute") or 0)
            gpu, profile, total = _where(e, labels, carved)
            dims = _dims(e.get("tenant") or "default", (gpu, profile))
            for h, ms in _hours_of(at - held, at):  # slice time in the hours it was held
                for dim in dims:
                    incr[(h, f"{dim}|leased_ms")] += ms
                    incr[(h, f"{dim}|compute_ms")] += ms * compute
                    incr[(h, f"{dim}|gpu_ms_x{total}")] += ms * compute
            for dim in dims:
                incr[(hour, f"{dim}|leases")] += 1
        elif kind == "lease.revoked":  # charged to the revoked lease's tenant (the event names it)
            field = "admin_revocations" if e.get("for") == "admin" else "preemptions"
            for dim in _dims(e.get("tenant") or "unknown", _where(e, labels, carved)[:2]):
                incr[(hour, f"{dim}|{field}")] += 1
        elif kind in ("inventory.published", "node.forgotten"):
            for sid in json.loads(e.get("gone") or "[]"):
                if sid in carved:
                    since, gpu, profile = carved.pop(sid)
                    _credit_carved(incr, since, at, gpu, profile)
            for sid, gpu, profile in json.loads(e.get("added") or "[]"):
                carved.setdefault(sid, [at, gpu, profile])
    return incr


def _credit_carved(incr, since: int, until: int, gpu: str, profile: str) -> None:  # noqa: ANN001
    for h, ms in _hours_of(since, until):
        for dim in (f"gpu={gpu}", f"profile={profile}", "all=all"):
            incr[(h, f"{dim}|carved_ms")] += ms


def _where(e: dict[str, str], labels, carved: dict) -> tuple[str, str, int]:  # noqa: ANN001
    """(gpu "node/index", profile, the GPU model's compute slices) of the event's slice as it was then:
    named by the event (a lease's end says where its slice was), else as the inventory events had it
    carved up to this event, else as the inventory has it now (a slice re-carved since is no longer
    there), else the profile of the grant's pkey."""
    from prefect_mig.model import get_model

    sid, model = e.get("slice", ""), e.get("model") or e.get("pkey", "").partition("/")[0]
    now = labels.get(sid)
    total = get_model(model).compute_slices if model else now[2] if now else 7
    if e.get("gpu") and e.get("profile"):
        return e["gpu"], e["profile"], total
    if sid in carved:
        return carved[sid][1], carved[sid][2], total
    if now:
        return now[0], now[1], total
    return "unknown", e.get("pkey", "").partition("/")[2] or "unknown", total


def _dims(tenant: str, where: tuple[str, str]) -> list[str]:
    gpu, profile = where
    return [f"tenant={tenant}", f"gpu={gpu}", f"profile={profile}", "all=all"]


def report(
    alloc: Allocator, *, since_s: float, by: By = "tenant", price_per_gpu_hour: float = 0.0
) -> dict[str, Any]:
    """Usage per `by` over the last `since_s` seconds (whole hours), after a roll-up; ``totals``
    holds the whole cluster's carved, leased and idle slice-hours (see the module's docstring)."""
    from prefect_mig.errors import ConfigError

    if by not in _DIMENSIONS:
        raise ConfigError(f"by={by!r}: must be one of {', '.join(_DIMENSIONS)}.", field="by", value=by)
    if not (math.isfinite(price_per_gpu_hour) and price_per_gpu_hour >= 0):
        raise ConfigError(f"--price-per-gpu-hour={price_per_gpu_hour}: must be a finite number, 0 or more.",
                          field="price_per_gpu_hour", value=price_per_gpu_hour)
    start, now, hours = _hours(alloc, since_s)
    sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, dims in hours:
        for (name, value), metrics in dims.items():
            if name in (by, "all"):
                for metric, n in metrics.items():
                    sums[value if name == by else "\0all"][metric] += n
    whole = sums.pop("\0all", {})
    rows = [_row(key, m, price_per_gpu_hour, idle=by != "tenant") for key, m in sorted(sums.items())]
    carved, leased = whole.get("carved_ms", 0) / HOUR_MS, whole.get("leased_ms", 0) / HOUR_MS
    totals = {"carved_slice_hours": round(carved, 6), "leased_slice_hours": round(leased, 6),
              "idle_slice_hours": round(max(0.0, carved - leased), 6)}
    return {"since_ms": start, "until_ms": now, "by": by, "price_per_gpu_hour": price_per_gpu_hour,
            "rows": rows, "totals": totals}


def hourly(alloc: Allocator, *, since_s: float) -> list[dict[str, Any]]:
    """Per hour of the last `since_s` seconds (after a roll-up): slice-hours leased per tenant and
    idle slice-hours (carved minus leased), ``[{"hour_ms", "leased": {tenant: h}, "idle": h}]``."""
    _, _, hours = _hours(alloc, since_s)
    out = []
    for hour, dims in hours:
        leased = {value: m["leased_ms"] / HOUR_MS for (name, value), m in sorted(dims.items())
                  if name == "tenant" and m.get("leased_ms")}
        whole = dims.get(("all", "all"), {})
        idle = max(0, whole.get("carved_ms", 0) - whole.get("leased_ms", 0)) / HOUR_MS
        out.append({"hour_ms": hour, "leased": leased, "idle": round(idle, 6)})
    return out


def _hours(alloc: Allocator, since_s: float) -> tuple[int, int, list[tuple[int, dict[tuple[str, str], dict[str, int]]]]]:
    """Roll up, then each hour from `since_s` ago (whole hours) to now with its sums by dimension
    ``{(name, value): {metric: n}}``, slices still carved counted up to now; (start, now, hours)."""
    roll_up(alloc)
    now = alloc.now_ms()
    start = now - int(since_s * 1000)
    start -= start % HOUR_MS
    k = alloc.keys
    with redis_errors("read usage"):
        stored = [int(decode(h)) for h in alloc.redis.zrangebyscore(k.usage_hours, start, now)]
        pipe = alloc.redis.pipeline(transaction=False)
        for h in stored:
            pipe.hgetall(k.usage(h))
        pipe.hgetall(k.usage_carved)
        *fields_by_hour, carved = pipe.execute()
    by_hour: dict[int, dict[tuple[str, str], dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))

    def add(hour: int, field: str, n: int) -> None:
        dim, _, metric = field.partition("|")
        name, _, value = dim.partition("=")
        by_hour[hour][(name, value)][metric] += n

    for h, fields in zip(stored, fields_by_hour):
        for f, v in fields.items():
            add(h, decode(f), int(decode(v)))
    incr: dict[tuple[int, str], int] = defaultdict(int)
    for raw in carved.values():  # still carved: up to now
        since, gpu, profile = json.loads(decode(raw))
        _credit_carved(incr, max(since, start), now, gpu, profile)
    for (h, field), n in incr.items():
        add(h, field, n)
    return start, now, sorted(by_hour.items())


def _row(key: str, m: dict[str, int], price: float, *, idle: bool) -> dict[str, Any]:
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
        "admin_revocations": m.get("admin_revocations", 0),
        "cost": round(gpu_ms / HOUR_MS * price, 4),
        # carved minus leased: a tenant has no idle time of its own (see `report`'s totals)
        "idle_slice_hours": round(max(0, m.get("carved_ms", 0) - m.get("leased_ms", 0)) / HOUR_MS, 6) if idle else None,
    }
