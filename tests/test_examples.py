"""The examples run as users run them, each on its own private simulated cluster."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from prefect_mig.allocator.invariants import check_events



EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def private_cluster(prefect_api, monkeypatch, python_image):
    monkeypatch.delenv("PREFECT_MIG_REDIS_URL", raising=False)
    monkeypatch.delenv("PREFECT_MIG_NAMESPACE", raising=False)


def test_inference_fanout_spreads_batches_over_the_1g_slices(private_cluster):
    rows = runpy.run_path(str(EXAMPLES / "inference_fanout.py"), run_name="example")["main"](6)
    assert [r["mean"] for r in rows] == [3.5 + i for i in range(6)]
    assert len({r["device"] for r in rows}) >= 2 and all(r["device"].startswith("MIG-") for r in rows)


def test_two_tenants_respects_the_quota_and_preempts_for_priority(private_cluster):
    out = runpy.run_path(str(EXAMPLES / "two_tenants.py"), run_name="example")["main"]()
    assert out["revocations"] == 1 and out["sweep"] == "sweep done" and out["prod_3g"].startswith("MIG-")
    events = out["events"]
    assert check_events(events, excused_order=True).violations == []
    held, most = {}, 0
    for e in events:  # research never held more than its quota of 2 slices at once
        if e["type"] == "lease.granted" and e.get("tenant") == "research":
            held[e["lease"]] = True
            most = max(most, len(held))
        elif e["type"] in ("lease.released", "lease.expired"):
            held.pop(e["lease"], None)
    assert most == 2
