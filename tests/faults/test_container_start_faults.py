"""A task container never runs on a slice its holder no longer holds: not when the holder was slow
between its grant and its container's start (the lease revoked or lapsed meanwhile, the slice
handed on), and not when the flow process loses its engine while the container runs (it cannot
confirm the container ended, so its lease lapses into quarantine instead of being released).
Real Redis, real Docker, a real node agent and Prefect API."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker.errors
import pytest
from prefect import flow
from prefect.cache_policies import NO_CACHE

from prefect_mig import MigTaskRunner, task
from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, LeaseClient, SliceRequest
from prefect_mig.allocator.leases import Lease
from prefect_mig.errors import LeaseLost
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.launchers.docker import ContainerSettings, DockerLauncher, cluster_labels, task_containers
from prefect_mig.model import Layout


class SlowToPickle:
    """An argument that takes seconds to pickle, as a big one does (also: a slow API, a slow engine)."""

    def __getstate__(self):
        time.sleep(4)
        return {}

    def __setstate__(self, state):
        pass


def sleep_with(arg=None):
    import time

    time.sleep(120)


def sleep_long():
    import time

    time.sleep(120)


def started_containers(docker_client, namespace: str, since: float) -> list[str]:
    """Ids of the containers of `namespace` the engine started since `since` (its event log)."""
    events = docker_client.events(
        since=int(since) - 1, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "start", "label": f"prefect-mig.namespace={namespace}"},
    )
    return [e["id"] for e in events]


def test_a_task_revoked_while_its_call_is_prepared_never_starts_its_container(cluster, namespace, docker_client):
    victim = task(
        task_runner=MigTaskRunner(profile="3g.40gb", priority=1, preemptible=True, lease_ttl_s=3), cache_policy=NO_CACHE,
    )(sleep_with)
    since = time.time()

    @flow
    def pipeline():
        future = victim.submit(SlowToPickle())
        deadline = time.monotonic() + 60
        while not cluster.status()["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)
        urgent = cluster.try_acquire(SliceRequest(profile="3g.40gb", priority=9), wait=True)
        state = future.wait(60) or future.state
        return state.is_failed(), state.message, urgent.request_id

    failed, message, urgent_id = pipeline()
    lease = cluster.lease(urgent_id)  # the slice went to the higher priority
    cluster.release(lease.lease_id, lease.fence)
    assert failed and "revoked" in message
    assert started_containers(docker_client, namespace, since) == [], "the revoked task's container started"


def test_a_container_never_starts_for_a_lease_that_lapsed_and_was_handed_on(redis_server, namespace, python_image,
                                                                             docker_client):
    alloc = Allocator(redis_server.client(), namespace)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    stalled = Lease(alloc, alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=1)))  # its holder renews nothing
    time.sleep(1.5)
    other = alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=30))
    assert other.slice.mig_uuid == stalled.mig_uuid  # handed on, and its holder does not know yet
    labels = {**cluster_labels(cluster_id=alloc.cluster_id(), namespace=namespace, node="node-a"),
              "lease-id": stalled.lease_id, "fence": stalled.fence}
    since = time.time()
    try:
        with pytest.raises(LeaseLost, match="expired|gone"):
            DockerLauncher(ContainerSettings(image=python_image)).run(
                sleep_long, mig_uuid=stalled.mig_uuid, labels=labels, stop=stalled.lost, confirm=stalled.confirm,
            )
        assert started_containers(docker_client, namespace, since) == []
        assert task_containers(docker_client, cluster_id=alloc.cluster_id(), namespace=namespace) == []
    finally:
        alloc.release(other.lease_id, other.fence)


@pytest.fixture
def engine_proxy(tmp_path):
    """A forwarder to the local engine's socket, and a way to cut the flow process off the engine."""
    upstream = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not upstream.startswith("unix://"):
        pytest.skip(f"the partition is made with a unix-socket forwarder; DOCKER_HOST={upstream} is not a socket")
    sock = tmp_path / "engine.sock"
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("engine_proxy.py")), str(sock),
                              upstream.removeprefix("unix://")])
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"unix://{sock}", proxy
    proxy.kill()
    proxy.wait()


def _cut_off_mid_task(body, cut, *, redis_server, namespace, monkeypatch, docker_client, engine_proxy, tmp_path):
    """Run `body` as node-a's only slice's task while holder B waits for that slice, and call
    ``cut(submitted, proxy)`` once the task's container runs: the flow process reaches the engine
    through `engine_proxy`, the agent directly. Returns (failed, message, B's grant, events)."""
    proxy_url, proxy = engine_proxy
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path / "nvml")) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))  # one slice: B can only get A's
        # the agent reaches the engine directly; the flow process through the proxy the agent publishes
        agent = NodeAgent(backend, Allocator(redis_server.client(), namespace), node="node-a",
                          docker_client=docker_client, docker_url=proxy_url)
        agent.tick()
        stop_agent = threading.Event()
        ticking = threading.Thread(target=agent.run, kwargs={"interval_s": 1.0, "stop": stop_agent}, daemon=True)
        ticking.start()
        cluster_id = agent.allocator.cluster_id()

        def a_container():
            return task_containers(docker_client, cluster_id=cluster_id, namespace=namespace, running_only=True)

        granted = {}

        def holder_b():
            lease = LeaseClient(redis_server.url, namespace).acquire(SliceRequest(profile="4g.24gb"), timeout_s=120)
            granted["a_running"] = bool(a_container())
            lease.release()

        @flow
        def pipeline():
            submitted = time.monotonic()
            future = body.submit()
            deadline = time.monotonic() + 60
            while not a_container() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert a_container(), "the task's container never started"
            b = threading.Thread(target=holder_b)
            b.start()
            time.sleep(1)
            cut(submitted, proxy)
            state = future.wait(120) or future.state
            b.join(120)
            return state.is_failed(), state.message

        try:
            failed, message = pipeline()
        finally:
            stop_agent.set()
            ticking.join(30)
            for c in task_containers(docker_client, cluster_id=cluster_id, namespace=namespace):
                try:
                    c.remove(force=True)
                except docker.errors.NotFound:
                    pass
    return failed, message, granted, [e["type"] for e in agent.allocator.events()]


def test_a_flow_process_cut_off_its_engine_leaves_the_lease_to_lapse_so_the_slice_waits_for_the_agent(
    prefect_api, redis_server, namespace, monkeypatch, python_image, docker_client, engine_proxy, tmp_path
):
    body = task(task_runner=MigTaskRunner(profile="4g.24gb", lease_ttl_s=6))(sleep_long)
    failed, message, granted, events = _cut_off_mid_task(
        body, lambda submitted, proxy: proxy.kill(),  # the partition: the flow process loses the engine, the agent does not
        redis_server=redis_server, namespace=namespace, monkeypatch=monkeypatch, docker_client=docker_client,
        engine_proxy=engine_proxy, tmp_path=tmp_path,
    )
    assert granted == {"a_running": False}, "B was granted the slice while A's container still ran on it"
    assert failed and "was left to lapse, not released" in message
    assert "lease.released" not in events[: events.index("slice.settled")], "A's lease was released, not left to lapse"


def test_a_task_timed_out_while_cut_off_its_engine_leaves_the_lease_to_lapse_so_the_slice_waits_for_the_agent(
    prefect_api, redis_server, namespace, monkeypatch, python_image, docker_client, engine_proxy, tmp_path
):
    """The timeout lands (raised into the task's thread) while the flow process cannot reach the
    engine: the container's removal is not confirmed, so the lease must lapse, not be released."""
    timeout_s = 20

    def cut_before_the_timeout(submitted, proxy):
        # a few seconds before the timeout: it lands while the task's wait still retries the
        # engine (DockerLauncher.ENGINE_GONE_S)
        time.sleep(max(0.0, submitted + timeout_s - 4 - time.monotonic()))
        proxy.kill()

    body = task(task_runner=MigTaskRunner(profile="4g.24gb", lease_ttl_s=6), timeout_seconds=timeout_s)(sleep_long)
    failed, message, granted, events = _cut_off_mid_task(
        body, cut_before_the_timeout, redis_server=redis_server, namespace=namespace, monkeypatch=monkeypatch,
        docker_client=docker_client, engine_proxy=engine_proxy, tmp_path=tmp_path,
    )
    assert failed and "exceeded timeout" in message, message
    assert granted == {"a_running": False}, "B was granted the slice while A's container still ran on it"
    assert "lease.released" not in events[: events.index("slice.settled")], "A's lease was released, not left to lapse"
