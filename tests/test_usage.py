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
    assert rows["team-low"]["preemptions"] == 1 and rows["team-low"]["admin_revocations"] == 0


def test_an_admin_revoke_is_counted_as_a_revocation_not_as_a_preemption(alloc, clock):
    """`prefect-mig lease revoke` takes a lease back for no other request: before, `report` counted it
    as a preemption, so a tenant looked pushed aside by higher priorities that never asked."""
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    lease = alloc.acquire(SliceRequest(profile="4g.24gb", tenant="team-a"), timeout_s=0)
    assert alloc.revoke(lease.lease_id) is not None
    alloc.release(lease.lease_id, lease.fence)
    rows = {r["key"]: r for r in report(alloc, since_s=3600, by="tenant")["rows"]}
    assert rows["team-a"]["admin_revocations"] == 1 and rows["team-a"]["preemptions"] == 0


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
    chart = tmp_path / "usage.png"
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--since", "1d", "--json",
                           "--png", str(chart)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [r["key"] for r in got["rows"]] == ["team-x"]
    assert got["totals"]["carved_slice_hours"] > 0 and got["totals"]["idle_slice_hours"] > 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    table = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--by", "profile"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0 and "idle" in table.stdout and "slice-hours carved" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--by", "color"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "by='color'" in bad.stderr
    for price in ("nan", "inf", "-1"):
        refused = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "report", "--price-per-gpu-hour", price],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert refused.returncode == 2, (price, refused.stdout, refused.stderr)
        assert "--price-per-gpu-hour" in refused.stderr and "finite number, 0 or more" in refused.stderr, refused.stderr


def test_a_price_that_is_not_a_finite_number_of_0_or_more_is_refused_naming_it(alloc):
    # an infinite price gave every row a cost of inf, which --json printed as Infinity (not JSON)
    for price in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ConfigError, match="finite number, 0 or more") as bad:
            report(alloc, since_s=3600, price_per_gpu_hour=price)
        assert bad.value.field == "price_per_gpu_hour"


SEVEN_1G = " + ".join(f"1g.10gb@{i}" for i in range(7))


def hold(alloc, clock, lease, seconds: int) -> None:
    """Let `seconds` pass while the holder renews, then release."""
    for _ in range(seconds // 600):
        clock.advance(600)
        alloc.renew(lease.lease_id, lease.fence, 900)
    clock.advance(seconds % 600)
    alloc.release(lease.lease_id, lease.fence)


def test_idle_slice_hours_are_carved_minus_leased_per_hour_and_follow_a_re_carve(alloc, clock):
    """One H100 carved 3g + 3x1g at H; team-b holds a 1g H..H+0:15, team-a the 3g H+0:30..H+2:00;
    at H+2:00 the GPU is re-carved 7x1g, which stays idle until H+3:00."""
    from prefect_mig.usage import hourly

    hour = (clock.now_ms() // 3_600_000 + 1) * 3_600_000
    clock.set_ms(hour)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    b = alloc.acquire(SliceRequest(profile="1g.10gb", tenant="team-b", ttl_s=900), timeout_s=0)
    hold(alloc, clock, b, 900)
    clock.advance(900)
    a = alloc.acquire(SliceRequest(profile="3g.40gb", tenant="team-a", ttl_s=900), timeout_s=0)
    hold(alloc, clock, a, 5400)
    got = report(alloc, since_s=3 * 3600, by="profile")
    assert got["totals"] == {"carved_slice_hours": 8.0, "leased_slice_hours": 1.75, "idle_slice_hours": 6.25}
    assert {r["key"]: r["idle_slice_hours"] for r in got["rows"]} == {"3g.40gb": 0.5, "1g.10gb": 5.75}
    by_hour = {h["hour_ms"]: h for h in hourly(alloc, since_s=3 * 3600)}
    assert by_hour[hour] == {"hour_ms": hour, "leased": {"team-a": 0.5, "team-b": 0.25}, "idle": 3.25}
    assert by_hour[hour + 3_600_000] == {"hour_ms": hour + 3_600_000, "leased": {"team-a": 1.0}, "idle": 3.0}
    tenants = report(alloc, since_s=3 * 3600, by="tenant")["rows"]
    assert {r["key"]: (r["slice_hours"], r["idle_slice_hours"]) for r in tenants} == {"team-a": (1.5, None), "team-b": (0.25, None)}

    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [SEVEN_1G]})  # the 3g goes, 1g@0..3 come
    roll_up(alloc)
    alloc.redis.xtrim(alloc.keys.events, maxlen=0)  # slices still carved count on after the trimming
    clock.advance(3600)
    got = report(alloc, since_s=4 * 3600, by="profile")
    assert got["totals"] == {"carved_slice_hours": 15.0, "leased_slice_hours": 1.75, "idle_slice_hours": 13.25}
    assert {r["key"]: r["idle_slice_hours"] for r in got["rows"]} == {"3g.40gb": 0.5, "1g.10gb": 12.75}
    assert hourly(alloc, since_s=4 * 3600)[-1] == {"hour_ms": hour + 2 * 3_600_000, "leased": {}, "idle": 7.0}


def test_a_re_carve_whose_events_were_trimmed_unread_is_matched_to_the_inventory_at_the_next_roll_up(alloc, clock):
    hour = (clock.now_ms() // 3_600_000 + 1) * 3_600_000
    clock.set_ms(hour)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    roll_up(alloc)
    clock.advance(3600)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [SEVEN_1G]})
    alloc.redis.xtrim(alloc.keys.events, maxlen=0)  # nobody rolled up in time: the re-carve is unseen
    clock.advance(3600)
    carved = {r["key"]: r["idle_slice_hours"] for r in report(alloc, since_s=86400, by="profile")["rows"]}
    assert carved == {"3g.40gb": 2.0, "1g.10gb": 6.0}  # the 3g counts until this roll-up, the new 1g from it
    clock.advance(3600)
    carved = {r["key"]: r["idle_slice_hours"] for r in report(alloc, since_s=86400, by="profile")["rows"]}
    assert carved == {"3g.40gb": 2.0, "1g.10gb": 13.0}


def test_a_lease_on_a_slice_re_carved_since_keeps_the_gpu_and_profile_it_was_granted_on(alloc, clock):
    """The report rolls up after the re-carve: the slice is no longer in the inventory, yet its lease
    counts for the profile and GPU (and the GPU model's share) it had, not "unknown"."""
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    lease = alloc.acquire(SliceRequest(profile="4g.24gb", tenant="team-a", ttl_s=900), timeout_s=0)
    hold(alloc, clock, lease, 1800)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    by_profile = {r["key"]: (r["slice_hours"], r["gpu_hours"], r["leases"]) for r in report(alloc, since_s=86400, by="profile")["rows"]}
    assert by_profile == {"4g.24gb": (0.5, 0.5, 1)}  # a 4g is all of an A30
    by_gpu = {r["key"]: (r["slice_hours"], r["leases"], r["mean_wait_s"]) for r in report(alloc, since_s=86400, by="gpu")["rows"]}
    assert by_gpu == {"node-a/0": (0.5, 1, 0.0)}
