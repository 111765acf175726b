"""Prometheus metrics: scraped from a real `prefect-mig metrics serve` process and from the API's
/metrics while leases churn on the session's real redis-server, checked against `status`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from importlib import resources

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefect_mig.allocator import Allocator, LeaseInfo, Quota, SliceRequest
from prefect_mig.errors import NoCapacity
from prefect_mig.metrics import BUCKETS_MS, priority_band

from .api_fixtures import ADMIN_TOKEN, _free_port

SEVEN = " + ".join(f"1g.10gb@{i}" for i in range(7))
MIXED = "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"


def parse(text: str) -> dict[str, list]:
    """metric family name -> its samples (name, labels, value)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample_sum(samples, name: str | None = None, **labels) -> float:
    return sum(
        s.value for s in samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def metrics_server(redis_server, namespace, tmp_path):
    """`prefect-mig metrics serve` in its own process, on a free port; yields its URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_MIG_REDIS_URL": redis_server.url,
        "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_STATE_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_mig.cli.main", "metrics", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=5)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"metrics server did not start: {proc.communicate()[1].decode()}") from None
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_a_scrape_from_the_metrics_server_matches_status_while_leases_churn(redis_client, namespace, metrics_server):
    alloc = Allocator(redis_client, namespace, wait_ttl_s=60)
    alloc.publish_fleet("node-a=1xH100-80GB,node-b=1xH100-80GB", layouts={"node-a": [SEVEN], "node-b": [MIXED]})
    alloc.set_quota("team-a", Quota(slices=3))
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(tenant: str) -> None:
        try:
            while not stop.is_set():
                try:
                    lease = alloc.acquire(SliceRequest(profile="1g.10gb", tenant=tenant), timeout_s=0)
                except NoCapacity:
                    continue
                alloc.release(lease.lease_id, lease.fence)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    workers = [threading.Thread(target=churn, args=(t,)) for t in ("team-a", "team-b", "team-b")]
    for w in workers:
        w.start()
    seen_grants = []
    try:
        for _ in range(5):
            m = parse(httpx.get(metrics_server, timeout=30).text)
            assert sample_sum(m["prefect_mig_slices"]) == 11  # every slice is counted once, in some state
            seen_grants.append(m["prefect_mig_lease_grants"][0].value)
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert not errors, errors
    assert seen_grants == sorted(seen_grants) and seen_grants[-1] > 0  # a counter never goes down

    # a known state: leases held by two tenants, one that expires, requests waiting
    held = [alloc.acquire(SliceRequest(profile="1g.10gb", tenant="team-a"), timeout_s=0) for _ in range(3)]
    held += [alloc.acquire(SliceRequest(profile="3g.40gb", tenant="team-b", priority=5), timeout_s=0)]
    short = alloc.acquire(SliceRequest(profile="1g.10gb", tenant="team-c", ttl_s=1), timeout_s=0)
    queued = [alloc.try_acquire(SliceRequest(profile="3g.40gb", tenant="team-b", priority=p), wait=True) for p in (10, 90)]
    queued.append(alloc.try_acquire(SliceRequest(profile="1g.10gb", tenant="team-a"), wait=True))  # quota-blocked
    assert all(not isinstance(q, LeaseInfo) for q in queued)
    time.sleep(1.2)
    alloc.reap()  # `short` expires
    status = alloc.status()
    m = parse(httpx.get(metrics_server, timeout=30).text)

    by_state = Counter((s["node"], str(s["gpu_index"]), s["profile"], s["state"]) for s in status["slices"])
    scraped = {
        (s.labels["node"], s.labels["gpu"], s.labels["profile"], s.labels["state"]): s.value
        for s in m["prefect_mig_slices"]
    }
    assert scraped == by_state
    assert sample_sum(m["prefect_mig_slices"], state="leased") == 4
    by_tenant = Counter(row["tenant"] for row in status["leases"])
    assert {s.labels["tenant"]: s.value for s in m["prefect_mig_leases"] if s.value} == by_tenant == {"team-a": 3, "team-b": 1}
    assert sample_sum(m["prefect_mig_tenant_compute_slices"], tenant="team-b") == 3
    assert sample_sum(m["prefect_mig_tenant_quota_slices"], tenant="team-a") == 3
    assert sample_sum(m["prefect_mig_queue_depth"]) == len(status["queue"]) == 3
    assert sample_sum(m["prefect_mig_queue_depth"], kind="H100-80GB/3g.40gb", priority_band="75-100") == 1
    assert sample_sum(m["prefect_mig_queue_depth"], kind="H100-80GB/3g.40gb", priority_band="0-24") == 1

    events = Counter(e["type"] for e in alloc.events())
    assert m["prefect_mig_lease_grants"][0].value == events["lease.granted"] > 4
    assert sample_sum(m["prefect_mig_lease_releases"]) == events["lease.released"]
    assert sample_sum(m["prefect_mig_lease_expiries"]) == events["lease.expired"] == 1
    waits = m["prefect_mig_lease_wait_seconds"]
    assert sample_sum(waits, "prefect_mig_lease_wait_seconds_count") == events["lease.granted"]
    assert sample_sum(waits, "prefect_mig_lease_wait_seconds_bucket", le="+Inf") == events["lease.granted"]
    held_for = m["prefect_mig_lease_duration_seconds"]
    ended = events["lease.released"] + events["lease.expired"]
    assert sample_sum(held_for, "prefect_mig_lease_duration_seconds_count") == ended
    # the lease that expired was held at least its TTL: it is in no bucket under 1 s
    assert sample_sum(held_for, "prefect_mig_lease_duration_seconds_bucket", le="+Inf") - sample_sum(
        held_for, "prefect_mig_lease_duration_seconds_bucket", le="1"
    ) >= 1
    agents = {s.labels["node"]: s.value for s in m["prefect_mig_agent_stale"]}
    assert agents == {"node-a": 0, "node-b": 0}
    assert all(0 <= s.value < 60 for s in m["prefect_mig_agent_heartbeat_age_seconds"])
    for lease in held:
        alloc.release(lease.lease_id, lease.fence)
    for q in queued:
        alloc.cancel(q.request_id)
    assert short.lease_id not in {row["lease_id"] for row in alloc.status()["leases"]}


def test_metric_names_follow_prometheus_conventions(redis_client, namespace, metrics_server):
    alloc = Allocator(redis_client, namespace)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    text = httpx.get(metrics_server, timeout=30).text
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("prefect_mig_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    assert re.search(r"^prefect_mig_lease_grants_total 0\.0$", text, re.M)


def test_layout_outcomes_and_fenced_containers_are_counted(alloc):
    from prefect_mig.metrics import render

    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    gpu = alloc.gpus()[0]["uuid"]
    for outcome in ("applied", "skipped", "applied"):
        alloc.set_desired(gpu, "2g.12gb@0 + 2g.12gb@2", kind="incremental")
        alloc.clear_desired(gpu, outcome=outcome)
    alloc.record_event("container.fenced", node="node-a", lease="x", fence="1")
    m = parse(render(alloc).decode())
    assert {s.labels["outcome"]: s.value for s in m["prefect_mig_layout_changes"] if s.name.endswith("_total")} == {
        "applied": 2, "skipped": 1,
    }
    assert m["prefect_mig_container_fences"][0].value == 1
    assert sample_sum(m["prefect_mig_events"], type="layout.desired") == 3


def test_agents_name_the_claim_that_wrote_their_last_heartbeat(alloc):
    """Heartbeats record the writer's node claim: which agent (host, pid) serves a node, in
    `health.agents` and as `prefect_mig_agent_info`; a beat without a claim names none."""
    from prefect_mig.allocator import health
    from prefect_mig.metrics import render
    from prefect_mig.node_claim import NodeClaim

    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    alloc.publish_fleet("node-b=1xA30-24GB", layouts={"node-b": ["4g.24gb@0"]})
    claim = NodeClaim(alloc, "node-a", ttl_s=30)
    claim.take()
    alloc.heartbeat("node-a", ttl_s=30, agent=claim.held_as())
    me = {"host": claim.identity["host"], "pid": os.getpid(), "id": claim.identity["id"]}
    seen = health.agents(alloc)
    assert seen["node-a"]["agent"] == me and seen["node-b"]["agent"] is None
    info = {s.labels["node"]: s for s in parse(render(alloc).decode())["prefect_mig_agent_info"]}
    assert list(info) == ["node-a"]
    assert info["node-a"].labels == {"node": "node-a", "host": me["host"], "pid": str(os.getpid())}
    assert info["node-a"].value == 1
    claim.release()


def test_the_wait_histogram_counts_a_wait_in_its_bucket(alloc, clock):
    from prefect_mig.metrics import render

    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    first = alloc.acquire(SliceRequest(profile="4g.24gb"), timeout_s=0)
    queued = alloc.try_acquire(SliceRequest(profile="4g.24gb"), wait=True)
    clock.advance(7)  # the waiter waits 7 s, then the holder releases after holding 7 s
    alloc.release(first.lease_id, first.fence)
    assert alloc.claim(queued.request_id, SliceRequest(profile="4g.24gb")) is not None
    waits = parse(render(alloc).decode())["prefect_mig_lease_wait_seconds"]
    buckets = {s.labels["le"]: s.value for s in waits if s.name.endswith("_bucket")}
    assert buckets["5"] == 1 and buckets["10"] == 2  # one grant waited 0 s, one 7 s
    assert sample_sum(waits, "prefect_mig_lease_wait_seconds_sum") == 7


def test_the_histogram_bounds_of_the_lua_are_those_the_exporter_labels():
    lua = resources.files("prefect_mig.allocator").joinpath("lua", "_lib.lua").read_text()
    body = re.search(r"HIST_BOUNDS_MS = \{([^}]*)\}", lua).group(1)
    assert tuple(int(x) for x in re.findall(r"\d+", body)) == BUCKETS_MS


def test_priority_bands_cover_every_priority():
    assert [priority_band(p) for p in (0, 24, 25, 50, 74, 75, 100)] == ["0-24", "0-24", "25-49", "50-74", "50-74", "75-100", "75-100"]


def test_the_api_serves_metrics_to_the_admin_token_only(served_api):
    lease = served_api.alloc.acquire(SliceRequest(profile="1g.10gb", tenant="team-a"), timeout_s=0)
    with served_api.client() as http:
        got = http.get("/metrics")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    assert {s.labels["tenant"]: s.value for s in parse(got.text)["prefect_mig_leases"]} == {"team-a": 1}
    client_token, _ = served_api.tokens.create(tenant="team-a", max_priority=10)
    with served_api.client(client_token) as http:
        assert http.get("/metrics").status_code == 403
    with served_api.client(None) as http:
        assert http.get("/metrics").status_code == 401
    served_api.alloc.release(lease.lease_id, lease.fence)
    assert ADMIN_TOKEN


def test_status_watch_draws_each_gpu_with_its_holders_and_the_queue(redis_server, namespace, tmp_path):
    alloc = Allocator(redis_server.client(), namespace, wait_ttl_s=120)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    alloc.acquire(SliceRequest(profile="2g.12gb", tenant="team-a", holder="job-1"), timeout_s=0)
    alloc.acquire(SliceRequest(profile="2g.12gb", tenant="team-b", holder="job-2"), timeout_s=0)
    alloc.try_acquire(SliceRequest(profile="2g.12gb", priority=80), wait=True)
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_STATE_DIR": str(tmp_path), "COLUMNS": "150"}
    done = subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", "status", "--watch", "--interval", "0.2", "--refreshes", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "node-a GPU 0" in out and "[##][##]" in out
    assert "2g.12gb@0: team-a/job-1" in out and "2g.12gb@2: team-b/job-2" in out
    assert "1 waiting request(s)" in out and "75-100" in out
    assert out.count("node-a GPU 0") == 3  # not a terminal: each view printed whole as it comes (first + 2)
    as_json = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "status", "--watch", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert json.loads(as_json.stdout)["queue"][0]["priority"] == 80  # --json stays one-shot


def test_every_metric_a_scrape_serves_is_in_the_table_the_readme_points_operators_to(alloc):
    # The README sends operators to prefect_mig/metrics.py's table for names and labels; a family
    # served but not listed there is one they cannot find when writing alerts.
    import prefect_mig.metrics as metrics

    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]}, heartbeat_ttl_s=60)
    alloc.set_quota("team-a", Quota(slices=1, compute=2))
    held = alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-a"))
    other = alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-b"))
    alloc.try_acquire(SliceRequest(profile="2g.12gb", tenant="team-b"), wait=True)  # queue_depth
    served = {f.name for f in text_string_to_metric_families(metrics.render(alloc).decode())}
    listed = {"prefect_mig_" + name.removesuffix("_total") for name in re.findall(r"``(\w+)``", metrics.__doc__.split("| name |")[1])}
    assert served - listed == set()
    alloc.release(held.lease_id, held.fence)
    alloc.release(other.lease_id, other.fence)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # a host not of this machine was blamed on the port: "--port=9808: ... pick a free port"
        (["--host", "256.1.1.1", "--port", "{busy}"], "--host='256.1.1.1', --port={busy}: cannot listen on 256.1.1.1:{busy}"),
        (["--port", "{busy}"], "--host='127.0.0.1', --port={busy}: cannot listen on 127.0.0.1:{busy} (Address already in use)"),
    ],
)
def test_metrics_serve_refuses_an_address_it_cannot_listen_on_naming_host_and_port_as_api_serve_does(
        redis_server, namespace, args, named):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace}
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "metrics", "serve", *[a.format(busy=busy) for a in args]],
                          env=env, capture_output=True, text=True, timeout=120)
    taken.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert named.format(busy=busy) in " ".join(done.stderr.split()), done.stderr
