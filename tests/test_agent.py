"""The node agent on a shared Docker engine: it touches only its own cluster's containers, outlives
vanishing containers and a Redis restart, and counts a slice used by a task container as busy."""

from __future__ import annotations

import threading
import time

import docker.errors
import pytest
import redis

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator
from prefect_mig.launchers.docker import task_containers
from tests.agent_fixtures import start_task_container


def _wait_until(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_agents_of_two_namespaces_on_one_engine_touch_only_their_own_containers(
    redis_client, a30, docker_client, python_image, containers
):
    ours, theirs = Allocator(redis_client, "team-a-" + str(id(a30))), Allocator(redis_client, "team-b-" + str(id(a30)))
    agent = NodeAgent(a30, ours, node="node-a", docker_client=docker_client)
    agent.publish()
    # a running task of the other cluster, on the same node name and engine: its lease is not in ours
    other = start_task_container(docker_client, python_image, theirs, lease_id="their-live-lease", fence=1)
    orphan = start_task_container(docker_client, python_image, ours, lease_id="our-ended-lease", fence=1)
    containers += [other, orphan]
    assert agent.fence_containers() == [orphan.id]
    assert {c.id for c in task_containers(docker_client, cluster_id=theirs.cluster_id(), namespace=theirs.keys.namespace)} == {other.id}
    assert ours.cluster_id() != theirs.cluster_id()


def test_a_container_that_vanishes_between_listing_and_removal_is_no_error(alloc, a30, docker_client, python_image, containers):
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client)
    agent.publish()
    containers.append(start_task_container(docker_client, python_image, alloc, lease_id="ended", fence=1))
    (listed,) = agent.own_containers()
    docker_client.containers.get(listed.id).remove(force=True)  # its flow ended meanwhile
    assert agent.fence(listed) is False
    assert agent.fence_containers() == []


def test_a_slice_whose_task_container_runs_is_busy_whatever_nvml_says(alloc, a30, docker_client, python_image, containers):
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client)
    first = a30.instances(0)[0]
    assert a30.processes(0).get(first.mig_uuid) in (None, [], 0)  # NVML sees nothing on it
    containers.append(start_task_container(docker_client, python_image, alloc, lease_id="x", fence=1, mig_uuid=first.mig_uuid))
    _, slices = agent.inventory()
    assert {s.mig_uuid: s.busy for s in slices} == {m.mig_uuid: m.mig_uuid == first.mig_uuid for m in a30.instances(0)}
    agent.publish()
    states = {s["mig_uuid"]: s["state"] for s in alloc.status()["slices"]}
    assert states[first.mig_uuid] == "unavailable"  # not granted while that container runs
    containers[0].remove(force=True)
    agent.tick()
    assert {s["state"] for s in alloc.status()["slices"]} == {"free"}


def test_the_agent_loop_outlives_vanishing_containers_and_a_redis_restart(
    fresh_redis_server, a30, docker_client, python_image, containers
):
    client = redis.Redis.from_url(fresh_redis_server.url, socket_connect_timeout=1, socket_timeout=2)
    alloc = Allocator(client, "agent-loop")
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, heartbeat_ttl_s=3)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, kwargs={"interval_s": 0.2, "stop": stop}, daemon=True)
    loop.start()
    try:
        _wait_until(lambda: alloc.status()["nodes"].get("node-a", {}).get("alive"))
        cluster_id = alloc.cluster_id()
        for i in range(5):  # containers of ended leases come and go while the agent fences
            try:
                containers.append(
                    start_task_container(docker_client, python_image, alloc, lease_id=f"gone-{i}", fence=1, command=("sleep", "0.3"))
                )
            except docker.errors.APIError:  # the agent removed it between create and start
                pass
        fresh_redis_server.kill()
        time.sleep(1.0)  # a few failing ticks (a loop that dies later in the outage fails the wait below: nobody republishes)
        assert loop.is_alive()
        fresh_redis_server.restart()
        client.flushall()  # and it came back empty
        _wait_until(lambda: alloc.status()["nodes"].get("node-a", {}).get("alive"))
        assert loop.is_alive()
        assert Allocator(client, "agent-loop").cluster_id() == cluster_id  # the agent put its id back
        assert len(alloc.status()["slices"]) == 2
        _wait_until(lambda: agent.own_containers() == [])
    finally:
        stop.set()
        loop.join(30)
    assert not loop.is_alive()


def test_a_revoked_holder_that_outlives_the_grace_is_stopped_by_the_agent_and_its_slice_handed_over(
    alloc, clock, a30, docker_client, python_image, containers
):
    """A revoked holder whose process died never releases: without the agent its slice would idle
    until the lease expired (here 600 s). Past the cluster's grace (5 s) the agent stops the
    holder's container and then releases the lease, and the revoking request gets the slice."""
    from prefect_mig.allocator import LeaseInfo, SliceRequest

    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client)
    agent.publish()
    kept = alloc.try_acquire(SliceRequest(profile="2g.12gb", priority=5, ttl_s=600))
    victim = alloc.try_acquire(SliceRequest(profile="2g.12gb", priority=1, preemptible=True, ttl_s=600))
    for lease in (kept, victim):
        containers.append(start_task_container(
            docker_client, python_image, alloc, lease_id=lease.lease_id, fence=lease.fence, mig_uuid=lease.slice.mig_uuid
        ))
    urgent = alloc.try_acquire(SliceRequest(profile="2g.12gb", priority=9, ttl_s=60), wait=True)
    assert not isinstance(urgent, LeaseInfo)
    assert alloc.lease(victim.lease_id).revoked

    assert agent.fence_containers() == []  # within the grace the holder may still stop by itself
    clock.advance(6)
    (stopped,) = agent.fence_containers()
    assert stopped == containers[1].id
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(stopped)
    docker_client.containers.get(containers[0].id)  # the holder that was not revoked runs on
    granted = alloc.lease(urgent.request_id)
    assert granted.slice.mig_uuid == victim.slice.mig_uuid
    assert {row["lease_id"] for row in alloc.status()["leases"]} == {kept.lease_id, urgent.request_id}
