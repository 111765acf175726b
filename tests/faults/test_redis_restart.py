"""Redis restarts and may have lost its last writes (a host crash with appendfsync everysec, a restore
from a backup, a failover to a lagging replica without PREFECT_MIG_REDIS_REPLICAS): a grant made just
before is gone while its holder's task container runs on. The allocator sees the restart (a new
server run_id) and grants nothing on a node whose agent fences containers until that agent has
fenced once after the restart; a node published without a fencing agent keeps granting."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import docker.errors
import pytest
import redis

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest
from prefect_mig.allocator.connection import MINIMAL_ACL
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import NoCapacity, RedisUnavailable
from tests.agent_fixtures import start_task_container

from .helpers import FLEET, ONE_SLICE

REQUEST = SliceRequest(profile="2g.12gb", ttl_s=600)


def _on_disk(server) -> None:
    """Rewrite the AOF and wait until the rewrite is done, so a copy of the data dir holds every write."""
    client = server.client()
    client.bgrewriteaof()
    deadline = time.monotonic() + 60
    while True:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        assert time.monotonic() < deadline, "the AOF rewrite never finished"
        time.sleep(0.05)


def _roll_back(server, snapshot: Path) -> None:
    """Kill the server and start it again on the same port from `snapshot`: the writes since are lost."""
    server.kill()
    shutil.rmtree(server.dir)
    shutil.copytree(snapshot, server.dir)
    server.restart()


def _fencing_node(server, a30, docker_client, namespace):
    alloc = Allocator(server.client(), namespace, max_ttl_s=600)
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, fence_settle_s=600)
    agent.tick()
    return alloc, agent


def test_a_slice_whose_grant_redis_lost_goes_to_nobody_until_the_agent_fenced_its_container(
    fresh_redis_server, a30, docker_client, python_image, containers, namespace, tmp_path
):
    server = fresh_redis_server
    alloc, agent = _fencing_node(server, a30, docker_client, namespace)
    _on_disk(server)
    snapshot = tmp_path / "before-the-grant"
    shutil.copytree(server.dir, snapshot)

    a = alloc.try_acquire(REQUEST)
    container = start_task_container(docker_client, python_image, alloc, lease_id=a.lease_id, fence=a.fence,
                                     mig_uuid=a.slice.mig_uuid)
    containers.append(container)
    _roll_back(server, snapshot)  # A's grant is lost; its container runs on

    with pytest.raises(NoCapacity):
        alloc.try_acquire(REQUEST)  # A's slice (and the other) wait for the agent's fencing pass
    queued = alloc.try_acquire(REQUEST, wait=True)
    assert not isinstance(queued, LeaseInfo)
    container.reload()
    assert container.status == "running"

    agent.tick()  # fences A's container (its lease is unknown now), then confirms the node fenced
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    b, c = alloc.lease(queued.request_id), alloc.try_acquire(REQUEST)  # both slices are in service again
    assert a.slice.mig_uuid in {b.slice.mig_uuid, c.slice.mig_uuid}
    assert min(b.fence, c.fence) > a.fence
    assert check_events(alloc.events()).violations == []


def test_after_a_clean_restart_the_node_grants_again_after_one_agent_pass(
    fresh_redis_server, a30, docker_client, python_image, containers, namespace
):
    server = fresh_redis_server
    alloc, agent = _fencing_node(server, a30, docker_client, namespace)
    a = alloc.try_acquire(REQUEST)
    container = start_task_container(docker_client, python_image, alloc, lease_id=a.lease_id, fence=a.fence,
                                     mig_uuid=a.slice.mig_uuid)
    containers.append(container)
    server.restart()  # nothing lost, but the allocator cannot know that

    with pytest.raises(NoCapacity):
        alloc.try_acquire(REQUEST)
    agent.tick()
    container.reload()
    assert container.status == "running"  # A's lease survived: its container is left alone
    b = alloc.try_acquire(REQUEST)
    assert isinstance(b, LeaseInfo) and b.slice.mig_uuid != a.slice.mig_uuid
    assert alloc.renew(a.lease_id, a.fence, ttl_s=600) is not None
    assert check_events(alloc.events()).violations == []


def test_a_node_without_a_fencing_agent_keeps_granting_after_a_restart(fresh_redis_server, namespace, tmp_path):
    server = fresh_redis_server
    alloc = Allocator(server.client(), namespace)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    _on_disk(server)
    snapshot = tmp_path / "before"
    shutil.copytree(server.dir, snapshot)
    _roll_back(server, snapshot)
    assert isinstance(alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=60)), LeaseInfo)


def test_a_redis_user_without_info_is_told_to_grant_it(fresh_redis_server, namespace):
    """The scripts need INFO to see a restart: a user set up with the older minimal ACL gets an error
    saying what to grant, never grants made blind to restarts."""
    fresh_redis_server.client().execute_command(
        "ACL", "SETUSER", "old-acl", *MINIMAL_ACL.removesuffix(" +info").split(), ">pw"
    )
    user = redis.Redis(host="127.0.0.1", port=fresh_redis_server.port, username="old-acl", password="pw")
    with pytest.raises(RedisUnavailable, match=r"INFO.*ACL SETUSER <user> \+info.*MINIMAL_ACL"):
        Allocator(user, namespace).publish_fleet(FLEET, layouts=ONE_SLICE)
    fresh_redis_server.client().execute_command("ACL", "SETUSER", "old-acl", "+info")
    Allocator(user, namespace).publish_fleet(FLEET, layouts=ONE_SLICE)
    assert isinstance(Allocator(user, namespace).try_acquire(SliceRequest(profile="4g.24gb", ttl_s=60)), LeaseInfo)
