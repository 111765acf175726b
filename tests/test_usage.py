"""Usage and cost reports from hourly rollups: numbers of a workload with known lease times
(virtual clock), still there after the events stream was trimmed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefect_mig.allocator import SliceRequest
from prefect_mig.cli.report import parse_since
from prefect_mig.errors import ConfigError
from prefect_mig.usage import report, roll_up

from .allocator_fixtures import H100_MIXED


def workload(alloc, clock):
    """team-a: a 3g held 30 min; team-b: three 1g, and a fourth that waits 10 min for one of them."""
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    big = alloc.acquire(SliceRequest(profile="3g.40gb", tenant="team-a", ttl_s=900), timeout_s=0)
    small = [alloc.acquire(SliceRequest(profile="1g.10gb", tenant="team-b", ttl_s=900), timeout_s=0) for _ in range(3)]
    request = SliceRequest(profile="1g.10gb", tenant="team-b", ttl_s=900)
    queued = alloc.try_acquire(request, wait=True)
    clock.advance(600)
    alloc.renew(big.lease_id, big.fence, 900)
    alloc.release(small[0].lease_id, small[0].fence)  # held 600 s; the waiter gets it after 600 s
    waiter = alloc.claim(queued.request_id, request)
    clock.advance(600)
    for lease in (waiter, *small[1:]):
        alloc.release(lease.lease_id, lease.fence)  # held 600, 1200, 1200 s
    alloc.renew(big.lease_id, big.fence, 900)
    clock.advance(600)
    alloc.release(big.lease_id, big.fence)  # held 1800 s


def test_the_report_adds_up_a_known_workload_per_tenant_with_cost(alloc, clock):
    workload(alloc, clock)
    got = {r["key"]: r for r in report(alloc, since_s=86400, by="tenant", price_per_gpu_hour=7.0)["rows"]}
    assert set(got) == {"team-a", "team-b"}
    a, b = got["team-a"], got["team-b"]
    assert (a["slice_hours"], a["compute_slice_hours"], a["gpu_hours"], a["leases"]) == (0.5, 1.5, round(1.5 / 7, 6), 1)
    assert (b["slice_hours"], b["compute_slice_hours"], b["gpu_hours"], b["leases"]) == (1.0, 1.0, round(1 / 7, 6), 4)
    assert (a["cost"], b["cost"]) == (1.5, 1.0)  # 7 per GPU-hour, a 1g is 1/7 of an H100
    assert b["mean_wait_s"] == 150.0 and b["p95_wait_s_at_most"] == 900.0  # waits 0, 0, 0, 600 s
    assert a["mean_wait_s"] == 0.0 and a["preemptions"] == b["preemptions"] == 0


def test_the_report_outlives_the_streams_trimming_and_does_not_count_twice(alloc, clock):
    workload(alloc, clock)
    before = report(alloc, since_s=86400, by="profile")["rows"]
    assert {r["key"]: r["slice_hours"] for r in before} == {"3g.40gb": 0.5, "1g.10gb": 1.0}
    alloc.redis.xtrim(alloc.keys.events, maxlen=0)  # the stream keeps only the newest events
    assert roll_up(alloc) == 0
    assert report(alloc, since_s=86400, by="profile")["rows"] == before
    gpus = report(alloc, since_s=86400, by="gpu")["rows"]
    assert [(r["key"], r["slice_hours"]) for r in gpus] == [("node-a/0", 1.5)]


def test_a_preemption_is_charged_to_the_revoked_tenant(alloc, clock):
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    low = alloc.acquire(SliceRequest(profile="4g.24gb", tenant="team-low", preemptible=True), timeout_s=0)
    roll_up(alloc)  # the grant is folded apart from the revocation: the event names the tenant
    urgent = SliceRequest(profile="4g.24gb", tenant="team-high", priority=9)
    queued = alloc.try_acquire(urgent, wait=True)
    alloc.release(low.lease_id, low.fence)
    high = alloc.claim(queued.request_id, urgent)
    alloc.release(high.lease_id, high.fence)
    rows = {r["key"]: r for r in report(alloc, since_s=3600, by="tenant")["rows"]}
    assert rows["team-low"]["preemptions"] == 1


def test_since_and_by_are_checked():
    assert parse_since("7d") == 7 * 86400 and parse_since("90m") == 5400
    with pytest.raises(ConfigError) as bad:
        parse_since("a week")
    assert bad.value.field == "since"


def test_the_report_command_prints_json(redis_server, namespace, tmp_path, alloc, clock):
    # the CLI uses Redis TIME: its report window is now, so this workload runs on the real clock
    from prefect_mig.allocator import Allocator

    real = Allocator(alloc.redis, namespace)
    real.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    lease = real.acquire(SliceRequest(profile="4g.24gb", tenant="team-x"), timeout_s=0)
    real.release(lease.lease_id, lease.fence)
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--since", "1d", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["key"] for r in json.loads(done.stdout)["rows"]] == ["team-x"]
    bad = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--by", "color"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "by='color'" in bad.stderr
