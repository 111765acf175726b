"""examples/grafana-dashboard.json: valid Grafana dashboard JSON whose every query names a metric
the exporter serves (scraped from a real cluster on the session's redis-server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from prefect_mig.allocator import Quota, SliceRequest
from prefect_mig.metrics import render
from prefect_mig.node_claim import NodeClaim

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana-dashboard.json"
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text", "row"}


def served_series(alloc) -> set[str]:
    """Every series name a scrape of a cluster with leases, a queue and a quota serves."""
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    alloc.set_quota("team-a", Quota(slices=1, compute=2))
    first = alloc.acquire(SliceRequest(profile="2g.12gb", tenant="team-b"), timeout_s=0)
    alloc.release(first.lease_id, first.fence)  # counted in the histograms
    alloc.acquire(SliceRequest(profile="2g.12gb", tenant="team-a"), timeout_s=0)
    alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-a"), wait=True)  # quota-blocked: waits
    claim = NodeClaim(alloc, "node-a", ttl_s=30)
    claim.take()
    alloc.heartbeat("node-a", ttl_s=30, agent=claim.held_as())  # an agent serves node-a
    text = render(alloc).decode()
    claim.release()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def queried_metrics(dashboard: dict) -> dict[str, set[str]]:
    """panel title -> the prefect_mig_* names its queries use."""
    return {
        p["title"]: {m for t in p["targets"] for m in re.findall(r"\bprefect_mig_[a-z0-9_]+", t["expr"])}
        for p in dashboard["panels"]
    }


def test_the_dashboard_is_valid_grafana_dashboard_json():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["title"], str) and dash["title"]
    assert isinstance(dash["uid"], str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["time"]["from"].startswith("now-")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 6
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")) and g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert expr.count("[") == expr.count("]"), expr


def test_every_panel_queries_metrics_the_exporter_serves(alloc):
    served = served_series(alloc)
    queried = queried_metrics(json.loads(DASHBOARD.read_text()))
    assert all(queried.values()), [t for t, names in queried.items() if not names]
    missing = {title: names - served for title, names in queried.items() if names - served}
    assert missing == {}
    # what the issue asks the dashboard to show
    used = set().union(*queried.values())
    for name in ("prefect_mig_compute_slices", "prefect_mig_queue_depth", "prefect_mig_lease_wait_seconds_bucket",
                 "prefect_mig_lease_grants_total", "prefect_mig_tenant_quota_slices", "prefect_mig_agent_stale",
                 "prefect_mig_agent_info"):
        assert name in used, name
