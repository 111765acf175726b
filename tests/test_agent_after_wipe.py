"""Redis lost its data while a holder's task container runs, then the node agent restarted: the
new agent may not know the cluster id the container carries (a wipe makes a new one). Its slice
must not go to anyone while that container runs; with the ids the agent keeps in its state dir it
fences the container (its lease is gone) and only then hands the slice to a waiter."""

from __future__ import annotations

import json
import logging
import stat

import docker.errors
import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, LeaseInfo, Queued, SliceRequest
from prefect_mig.known_cluster_ids import KEEP, KnownClusterIds
from tests.agent_fixtures import start_task_container

REQUEST = SliceRequest(profile="2g.12gb", ttl_s=600)


def _holders(alloc: Allocator) -> dict[str, tuple[str, str | None]]:
    """{mig_uuid: (state, lease id)} of the published slices."""
    return {s["mig_uuid"]: (s["state"], s["lease"]) for s in alloc.status()["slices"]}


def _running(docker_client, container) -> bool:
    try:
        return docker_client.containers.get(container.id).status == "running"
    except docker.errors.NotFound:
        return False


@pytest.fixture
def wiped(fresh_redis_server, a30, docker_client, python_image, containers, tmp_path, namespace):
    """An agent published node-a with a state dir, holder A leased a slice and runs its task
    container, then Redis lost everything (FLUSHALL). Gives (lease A, A's container, state dir)
    (the namespace is the test's own: other runs on the engine never see these containers)."""
    state = tmp_path / "state"
    NodeAgent(a30, Allocator(fresh_redis_server.client(), namespace), node="node-a", docker_client=docker_client,
              state_dir=state).tick()
    holder = Allocator(fresh_redis_server.client(), namespace)
    lease = holder.try_acquire(REQUEST)
    container = start_task_container(
        docker_client, python_image, holder, lease_id=lease.lease_id, fence=lease.fence, mig_uuid=lease.slice.mig_uuid
    )
    containers.append(container)
    fresh_redis_server.client().flushall()
    return lease, container, state


def _queue_both(alloc: Allocator) -> Queued:
    """Ask for both 2g slices: the idle one is granted, the second request waits (returned)."""
    first = alloc.try_acquire(REQUEST, wait=True)
    assert isinstance(first, LeaseInfo)
    second = alloc.try_acquire(REQUEST, wait=True)
    assert isinstance(second, Queued)
    return second


def test_an_agent_restarted_after_a_wipe_without_memory_grants_no_slice_an_old_container_runs_on(
    wiped, fresh_redis_server, a30, docker_client, namespace, caplog
):
    lease_a, container, _ = wiped
    alloc = Allocator(fresh_redis_server.client(), namespace)  # a new agent process: no cached cluster id
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client)  # and no state dir
    with caplog.at_level(logging.WARNING, logger="prefect_mig.agent"):
        agent.tick()
    assert alloc.cluster_id() != container.labels["prefect-mig.cluster"]  # a new id: the old one is unknown here
    assert _holders(alloc)[lease_a.slice.mig_uuid] == ("unavailable", None)
    assert container.short_id in caplog.text and "Not removing" in caplog.text
    waiting = _queue_both(alloc)
    for _ in range(3):
        agent.tick()
        assert _holders(alloc)[lease_a.slice.mig_uuid] == ("unavailable", None)
    assert _running(docker_client, container)  # a cluster id it does not know: never removed on that basis
    container.remove(force=True)  # the old holder stops (told at its next renewal that its lease is gone)
    agent.tick()
    assert _holders(alloc)[lease_a.slice.mig_uuid] == ("leased", waiting.request_id)


def test_an_agent_restarted_after_a_wipe_fences_its_old_container_before_the_slice_goes_to_a_waiter(
    wiped, fresh_redis_server, a30, docker_client, namespace
):
    lease_a, container, state = wiped
    alloc = Allocator(fresh_redis_server.client(), namespace)
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, state_dir=state)
    agent.publish()  # what `prefect-mig agent` does first
    assert _holders(alloc)[lease_a.slice.mig_uuid] == ("unavailable", None)
    waiting = _queue_both(alloc)
    agent.tick()  # fences the container (its lease is gone), then republishes the slice idle
    assert not _running(docker_client, container)
    assert _holders(alloc)[lease_a.slice.mig_uuid] == ("leased", waiting.request_id)
    (fenced,) = [e for e in alloc.events() if e["type"] == "container.fenced"]
    assert fenced["lease"] == lease_a.lease_id
    assert container.labels["prefect-mig.cluster"] in KnownClusterIds.in_state_dir(state, namespace=namespace, node="node-a").ids


def test_the_known_cluster_ids_are_private_and_bounded(tmp_path):
    ids = KnownClusterIds.in_state_dir(tmp_path / "state", namespace="team/a", node="node-a")
    for i in range(KEEP + 5):
        ids.add(f"id-{i}")
    again = KnownClusterIds.in_state_dir(tmp_path / "state", namespace="team/a", node="node-a")
    assert again.ids == [f"id-{i}" for i in range(5, KEEP + 5)]  # the most recent ones
    assert json.loads(again.path.read_text()) == again.ids
    assert again.path.parent == tmp_path / "state" / "agent"  # the namespace's "/" is quoted, not a folder
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(again.path.parent.stat().st_mode) == 0o700
    assert KnownClusterIds.in_state_dir(tmp_path / "state", namespace="team/a", node="node-b").ids == []


def test_an_unreadable_ids_file_is_logged_and_replaced(tmp_path, caplog):
    path = tmp_path / "agent" / "ns@node-a.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="prefect_mig.agent"):
        ids = KnownClusterIds(path)
    assert ids.ids == [] and str(path) in caplog.text
    assert ids.add("c1") and KnownClusterIds(path).ids == ["c1"]
