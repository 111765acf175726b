"""Prometheus metrics for a whole cluster, computed from Redis at each scrape.

One exporter covers the cluster: nothing is kept in the exporting process, so any number of them
(``prefect-mig metrics serve``, the HTTP API's ``/metrics``) serve the same figures. Gauges come from
the allocator's state (slices, queue, leases, agents' heartbeats, quotas); counters and histograms
from the hash the allocator's scripts count every transition in (``Keys.counters``), which outlives
the events stream's trimming and costs a scrape one ``HGETALL``. Live leases per tenant are summed
inside Redis by a read-only script (``lua/tenant_usage.lua``), and the slices' records are read again
only when an inventory was published since the last scrape.

A scrape reads Redis in one pipelined snapshot (``MULTI``) and never the events stream, so it does
not slow the allocator (``bench/metrics_scrape.py`` measures it on a 1,000-GPU inventory).

Metrics (all prefixed ``prefect_mig_``):

| name | type | labels |
|---|---|---|
| ``slices`` | gauge | node, gpu, gpu_model, profile, state |
| ``compute_slices`` | gauge | node, gpu, gpu_model, state |
| ``queue_depth`` | gauge | kind, priority_band |
| ``queue_oldest_wait_seconds`` | gauge | kind |
| ``leases`` | gauge | tenant |
| ``tenant_compute_slices`` | gauge | tenant |
| ``tenant_quota_slices`` / ``tenant_quota_compute_slices`` | gauge | tenant (tenants with that limit) |
| ``agent_heartbeat_age_seconds`` / ``agent_stale`` | gauge | node |
| ``agent_info`` | gauge (1) | node, host, pid (the agent whose node claim wrote the last heartbeat) |
| ``lease_grants_total``, ``lease_releases_total``, ``lease_expiries_total``, ``lease_revocations_total`` | counter | |
| ``container_fences_total`` | counter | (task containers removed by agents) |
| ``slice_fence_waits_total`` | counter | (slices held back after their holder's lease expired, until the agent confirmed its container gone) |
| ``layout_changes_total`` | counter | outcome (applied, skipped) |
| ``events_total`` | counter | type (every transition in the events stream) |
| ``lease_wait_seconds`` | histogram | (time from request to grant) |
| ``lease_duration_seconds`` | histogram | (time from grant to release, expiry or revocation's end) |

Examples:
    ```python
    from prometheus_client.parser import text_string_to_metric_families
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.metrics import render
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
        alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-a"))
        families = {f.name: f for f in text_string_to_metric_families(render(alloc).decode())}
        assert [s.value for s in families["prefect_mig_leases"].samples] == [1.0]
        assert families["prefect_mig_lease_grants"].samples[0].value == 1.0
    ```
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.health import beat_writer
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.models import decode

__all__ = ["BUCKETS_MS", "CONTENT_TYPE_LATEST", "ClusterCollector", "priority_band", "registry_for", "render"]

#: Histogram bounds in ms; the Lua (``HIST_BOUNDS_MS`` in ``_lib.lua``) counts with the same ones.
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 900000, 3600000, 14400000)

#: event type -> (counter name, help)
_COUNTERS = {
    "lease.granted": ("prefect_mig_lease_grants", "Leases granted."),
    "lease.released": ("prefect_mig_lease_releases", "Leases released by their holder."),
    "lease.expired": ("prefect_mig_lease_expiries", "Leases that expired (not renewed in time)."),
    "lease.revoked": ("prefect_mig_lease_revocations",
                      "Leases revoked: preemptible ones for a higher priority, or any by an admin (lease revoke)."),
    "container.fenced": ("prefect_mig_container_fences", "Task containers a node agent removed (lease gone, stale fence)."),
    "slice.quarantined": (
        "prefect_mig_slice_fence_waits",
        "Slices held back after their holder's lease expired until the node agent confirmed its container gone.",
    ),
}

_BANDS = ((0, 24), (25, 49), (50, 74), (75, 100))


def priority_band(priority: int) -> str:
    """The queue's priority band label: ``0-24``, ``25-49``, ``50-74`` or ``75-100``."""
    for low, high in _BANDS:
        if priority <= high:
            return f"{low}-{high}"
    return "75-100"


class ClusterCollector(Collector):
    """A prometheus-client collector over one cluster's Redis state (see the module docstring).

    Args:
        allocator: the cluster's allocator (only its Redis client, keys and clock are used).
    """

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        self._tenant_usage = allocator.redis.register_script(
            resources.files("prefect_mig.allocator").joinpath("lua", "tenant_usage.lua").read_text()
        )
        # slice id -> parsed record, re-read when the inventory was published again (or an id is new):
        # a scrape then reads only the slices' states, not 7,000 JSON records
        self._slices: dict[str, tuple[tuple[str, str, str], str, int]] = {}
        self._published: str | None = None

    def _snapshot(self) -> dict[str, Any]:
        k = self.allocator.keys
        r = self.allocator.redis
        with redis_errors("read the cluster for metrics"):
            pipe = r.pipeline(transaction=True)
            pipe.hgetall(k.slice_state).hgetall(k.requests).hgetall(k.counters)
            pipe.hgetall(k.quotas).hgetall(k.heartbeats).hkeys(k.nodes)
            self._tenant_usage(keys=[k.leases], args=[k.prefix], client=pipe)
            states, requests, counters, quotas, beats, nodes, usage = pipe.execute()
            d = lambda m: {decode(a): decode(b) for a, b in m.items()}  # noqa: E731
            states, counters = d(states), d(counters)
            published = counters.get("event:inventory.published")
            if published != self._published or not states.keys() <= self._slices.keys():
                self._slices = {sid: _slice_labels(raw) for sid, raw in d(r.hgetall(k.slices)).items()}
                self._published = published
        usage = [decode(x) for x in usage]
        return {
            "states": states, "requests": d(requests), "counters": counters,
            "quotas": d(quotas), "beats": d(beats), "nodes": sorted(decode(n) for n in nodes),
            "usage": {usage[i]: (int(usage[i + 1]), int(usage[i + 2])) for i in range(0, len(usage), 3)},
            "now_ms": self.allocator.now_ms(),
        }

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._inventory(snap)
        yield from self._queue(snap)
        yield from self._tenants(snap)
        yield from self._agents(snap)
        yield from self._counters(snap["counters"])

    def _inventory(self, snap: dict[str, Any]) -> Iterator[Metric]:
        slices: Counter[tuple] = Counter()
        compute: Counter[tuple] = Counter()
        for sid, value in snap["states"].items():
            known = self._slices.get(sid)
            if known is None:  # removed between the two reads
                continue
            gpu, profile, n_compute = known
            state = value.partition("|")[0]
            slices[(*gpu, profile, state)] += 1
            compute[(*gpu, state)] += n_compute
        g = GaugeMetricFamily(
            "prefect_mig_slices", "MIG slices published, by GPU, profile and state (free, leased, draining, ...).",
            labels=["node", "gpu", "gpu_model", "profile", "state"],
        )
        for labels, n in sorted(slices.items()):
            g.add_metric(list(labels), n)
        yield g
        g = GaugeMetricFamily(
            "prefect_mig_compute_slices", "Compute slices of the published MIG slices, by GPU and state.",
            labels=["node", "gpu", "gpu_model", "state"],
        )
        for labels, n in sorted(compute.items()):
            g.add_metric(list(labels), n)
        yield g

    def _queue(self, snap: dict[str, Any]) -> Iterator[Metric]:
        depth: Counter[tuple[str, str]] = Counter()
        oldest: dict[str, int] = {}
        for raw in snap["requests"].values():
            r = json.loads(raw)
            kind = ",".join(r.get("pkeys", []))
            depth[(kind, priority_band(int(r.get("priority", 0))))] += 1
            at = int(r.get("enqueued_at") or snap["now_ms"])
            oldest[kind] = min(oldest.get(kind, at), at)
        g = GaugeMetricFamily(
            "prefect_mig_queue_depth", "Requests waiting for a slice, by the kinds they accept and priority band.",
            labels=["kind", "priority_band"],
        )
        for labels, n in sorted(depth.items()):
            g.add_metric(list(labels), n)
        yield g
        g = GaugeMetricFamily(
            "prefect_mig_queue_oldest_wait_seconds", "How long the longest-waiting request of each kind has waited.",
            labels=["kind"],
        )
        for kind, at in sorted(oldest.items()):
            g.add_metric([kind], max(0, snap["now_ms"] - at) / 1000)
        yield g

    def _tenants(self, snap: dict[str, Any]) -> Iterator[Metric]:
        leases = {t: n for t, (n, _) in snap["usage"].items()}
        compute = {t: c for t, (_, c) in snap["usage"].items()}
        quotas = {t: json.loads(q) for t, q in snap["quotas"].items()}
        for t in quotas:
            leases.setdefault(t, 0)
            compute.setdefault(t, 0)
        yield _per_tenant("prefect_mig_leases", "Live leases, by tenant.", leases)
        yield _per_tenant("prefect_mig_tenant_compute_slices", "Compute slices the tenant's live leases hold.", compute)
        for field, name in (("slices", "prefect_mig_tenant_quota_slices"), ("compute", "prefect_mig_tenant_quota_compute_slices")):
            limits = {t: q[field] for t, q in quotas.items() if q.get(field) is not None}
            yield _per_tenant(name, f"The tenant's quota of concurrent {field.replace('compute', 'compute slices')}.", limits)

    def _agents(self, snap: dict[str, Any]) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "prefect_mig_agent_heartbeat_age_seconds", "Seconds since the node agent's last heartbeat.", labels=["node"]
        )
        stale = GaugeMetricFamily(
            "prefect_mig_agent_stale", "1 if the node agent is silent past its heartbeat TTL (no new grants there).",
            labels=["node"],
        )
        info = GaugeMetricFamily(
            "prefect_mig_agent_info", "1 for the agent (host, pid) whose node claim wrote the node's last heartbeat.",
            labels=["node", "host", "pid"],
        )
        for node in snap["nodes"]:
            raw = snap["beats"].get(node)
            if raw is None:
                stale.add_metric([node], 1)
                continue
            beat = json.loads(raw)
            age_ms = max(0, snap["now_ms"] - int(beat["at"]))
            age.add_metric([node], age_ms / 1000)
            stale.add_metric([node], 1 if age_ms > beat["ttl_ms"] else 0)
            writer = beat_writer(beat)
            if writer is not None:
                info.add_metric([node, writer["host"], str(writer["pid"])], 1)
        yield age
        yield stale
        yield info

    def _counters(self, counters: dict[str, str]) -> Iterator[Metric]:
        events = {f.removeprefix("event:"): int(v) for f, v in counters.items() if f.startswith("event:")}
        for kind, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], events.get(kind, 0))
            yield c
        c = CounterMetricFamily("prefect_mig_layout_changes", "Desired layouts an agent applied or skipped.", labels=["outcome"])
        for outcome in ("applied", "skipped"):
            c.add_metric([outcome], events.get(f"layout.{outcome}", 0))
        yield c
        c = CounterMetricFamily("prefect_mig_events", "Transitions in the allocator's events stream, by type.", labels=["type"])
        for kind, n in sorted(events.items()):
            c.add_metric([kind], n)
        yield c
        yield _histogram("prefect_mig_lease_wait_seconds", "Time from a request to its grant.", counters, "wait_ms")
        yield _histogram(
            "prefect_mig_lease_duration_seconds", "Time a lease was held (grant to release or expiry).", counters, "held_ms"
        )


def _slice_labels(raw: str) -> tuple[tuple[str, str, str], str, int]:
    s = json.loads(raw)
    return (s["node"], str(s["gpu_index"]), s["gpu_model"]), s["profile"], int(s.get("compute_slices", 0))


def _per_tenant(name: str, doc: str, values: dict[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["tenant"])
    for tenant, v in sorted(values.items()):
        g.add_metric([tenant], v)
    return g


def _histogram(name: str, doc: str, counters: dict[str, str], field: str) -> HistogramMetricFamily:
    buckets, total = [], 0
    for i, bound in enumerate((*BUCKETS_MS, None), start=1):
        total += int(counters.get(f"{field}:{i}", 0))
        buckets.append(("+Inf" if bound is None else f"{bound / 1000:g}", total))
    h = HistogramMetricFamily(name, doc)
    h.add_metric([], buckets, int(counters.get(f"{field}:sum", 0)) / 1000)
    return h


def registry_for(allocator: Allocator) -> CollectorRegistry:
    """A registry holding only the cluster's collector (no process metrics of the exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(allocator))
    return registry


def render(allocator: Allocator, registry: CollectorRegistry | None = None) -> bytes:
    """The cluster's metrics in the Prometheus text format."""
    return generate_latest(registry or registry_for(allocator))
