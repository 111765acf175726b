"""A slice whose holder died (its lease expired, no release) is never used by two holders: it waits
in quarantine until its node's agent has removed the dead holder's task container, then goes to the
next waiter at once; a node without a fencing agent hands it over at expiry as before."""

from __future__ import annotations

import threading
import time

import docker.errors
import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import LeaseInfo, SliceRequest
from prefect_mig.allocator.invariants import check_events
from prefect_mig.errors import LeaseLost
from tests.agent_fixtures import start_task_container


def _granted(alloc, request_id: str) -> LeaseInfo | None:
    try:
        return alloc.lease(request_id)
    except LeaseLost:
        return None


def _holder_dies_with_a_waiter(alloc, clock, agent, docker_client, image, containers):
    """Both slices leased, each with its task container; the short lease's holder dies (never renews
    nor releases) while a request waits. Returns (dead lease, its container, the queued request)."""
    agent.publish()
    kept = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=600))
    dead = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=10))
    for lease in (kept, dead):
        containers.append(start_task_container(
            docker_client, image, alloc, lease_id=lease.lease_id, fence=lease.fence, mig_uuid=lease.slice.mig_uuid
        ))
    clock.advance(5)
    queued = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=60), wait=True)
    assert not isinstance(queued, LeaseInfo)
    clock.advance(6)  # the dead holder's lease is past its expiry
    return dead, containers[1], queued


def test_an_expired_holders_slice_goes_to_the_waiter_only_after_the_agent_removed_its_container(
    alloc, clock, a30, docker_client, python_image, containers
):
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client)
    dead, container, queued = _holder_dies_with_a_waiter(alloc, clock, agent, docker_client, python_image, containers)

    assert alloc.reap()[0] == 1
    assert _granted(alloc, queued.request_id) is None  # its container still runs on the slice
    container.reload()
    assert container.status == "running"
    states = {s["mig_uuid"]: s["state"] for s in alloc.status()["slices"]}
    assert states[dead.slice.mig_uuid] == "quarantined"

    agent.tick()  # fences the dead holder's container, then settles its slice
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    granted = _granted(alloc, queued.request_id)
    assert granted is not None and granted.slice.mig_uuid == dead.slice.mig_uuid
    events = alloc.events()
    assert [e["by"] for e in events if e["type"] == "slice.settled"] == ["agent"]
    assert check_events(events).violations == []


def test_the_agent_loop_hands_the_slice_over_within_a_tick_of_removing_the_container(
    alloc, clock, a30, docker_client, python_image, containers
):
    """The fallback settle time (10 min of a clock that does not move here) cannot explain the
    hand-over: the agent's confirmation does, in the tick that removed the container."""
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, fence_settle_s=600)
    dead, container, queued = _holder_dies_with_a_waiter(alloc, clock, agent, docker_client, python_image, containers)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, kwargs={"interval_s": 0.2, "stop": stop}, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while (granted := _granted(alloc, queued.request_id)) is None:
            assert time.monotonic() < deadline, "the waiter never got the slice"
            time.sleep(0.1)
    finally:
        stop.set()
        loop.join(30)
    assert granted.slice.mig_uuid == dead.slice.mig_uuid
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    events = alloc.events()
    fenced = [i for i, e in enumerate(events) if e["type"] == "container.fenced" and e["lease"] == dead.lease_id]
    settled = [i for i, e in enumerate(events) if e["type"] == "slice.settled"]
    granted_at = [i for i, e in enumerate(events) if e["type"] == "lease.granted" and e["lease"] == queued.request_id]
    assert fenced and settled and granted_at and fenced[0] < settled[0] < granted_at[0]
    assert events[settled[0]]["by"] == "agent"
    assert check_events(events).violations == []


def test_a_slice_whose_container_is_never_confirmed_gone_waits_only_the_fallback_settle_time(
    alloc, clock, a30, docker_client, python_image, containers
):
    """The cost of an agent that cannot fence (its engine keeps failing): the waiter waits the
    fallback settle time, not forever."""
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, fence_settle_s=12, heartbeat_ttl_s=600)
    dead, _, queued = _holder_dies_with_a_waiter(alloc, clock, agent, docker_client, python_image, containers)
    alloc.reap()  # no agent tick: nobody confirms
    clock.advance(8)
    alloc.reap()
    assert _granted(alloc, queued.request_id) is None
    clock.advance(5)
    alloc.reap()
    granted = _granted(alloc, queued.request_id)
    assert granted is not None and granted.slice.mig_uuid == dead.slice.mig_uuid
    assert [e["by"] for e in alloc.events() if e["type"] == "slice.settled"] == ["timeout"]


def test_a_slice_awaiting_its_fence_on_a_lost_node_waits_for_the_agent_to_come_back_and_fence(
    alloc, clock, a30, docker_client, python_image, containers
):
    """Nobody fences on a node whose agent stopped heartbeating, so the fallback does not run out
    there: when the agent comes back, its heartbeat alone does not hand the slice out, its fencing
    step does."""
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, fence_settle_s=12, heartbeat_ttl_s=20)
    dead, container, queued = _holder_dies_with_a_waiter(alloc, clock, agent, docker_client, python_image, containers)
    alloc.reap()  # t=11: quarantined until t=23
    clock.advance(13)
    assert alloc.reap()[2] == 1  # t=24: the node is lost (no heartbeat since t=0) and the fallback is due
    states = {s["mig_uuid"]: s["state"] for s in alloc.status()["slices"]}
    assert states[dead.slice.mig_uuid] == "quarantined"
    assert alloc.heartbeat("node-a", ttl_s=20) == "back"
    alloc.reap()
    assert _granted(alloc, queued.request_id) is None
    agent.tick()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    granted = _granted(alloc, queued.request_id)
    assert granted is not None and granted.slice.mig_uuid == dead.slice.mig_uuid
    assert check_events(alloc.events()).violations == []


def test_a_node_forgotten_as_gone_that_comes_back_grants_no_slice_until_its_agent_removed_the_old_container(
    alloc, clock, a30, docker_client, python_image, containers
):
    """`node forget --host-is-gone` drops slices awaiting a fence: if the host was not gone after all
    (a partition, a long freeze) and a dead holder's task container still runs, its agent's first
    publish brings every slice back quarantined, and only its fencing pass lets them go."""
    from prefect_mig.errors import NodeInUse

    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, fence_settle_s=600)
    agent.publish()
    dead = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=10))
    container = start_task_container(docker_client, python_image, alloc, lease_id=dead.lease_id, fence=dead.fence,
                                     mig_uuid=dead.slice.mig_uuid)
    containers.append(container)
    clock.advance(31)  # the agent's heartbeat and the holder's lease lapsed
    alloc.reap()
    with pytest.raises(NodeInUse) as refused:
        alloc.forget_node("node-a")
    assert "awaits the fencing" in str(refused.value) and "--host-is-gone" in str(refused.value)
    assert alloc.forget_node("node-a", host_is_gone=True) == (2, 1)
    assert alloc.status()["slices"] == [] and alloc.gpus() == []

    agent.publish()  # the host was not gone: its agent publishes the node again
    states = {s["mig_uuid"]: s["state"] for s in alloc.status()["slices"]}
    assert states.pop(dead.slice.mig_uuid) == "unavailable"  # busy: the old container runs there
    assert list(states.values()) == ["quarantined"]  # idle, but no fencing pass has run yet
    awaiting = {mig: lease for lease, mig in alloc.awaiting_fence("node-a").values()}
    assert len(awaiting) == 2 and awaiting[dead.slice.mig_uuid] == dead.lease_id
    assert not alloc.redis.exists(alloc.keys.forgotten("node-a"))  # once: the next publish holds nothing
    first, second = (alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=60), wait=True) for _ in range(2))
    assert not isinstance(first, LeaseInfo) and not isinstance(second, LeaseInfo)
    alloc.reap()
    assert _granted(alloc, first.request_id) is None
    # the agent's check alone, before any fencing: the slice the old container runs on stays out
    agent.settle_quarantine(alloc.awaiting_fence("node-a"))
    got = _granted(alloc, first.request_id)
    assert got is not None and got.slice.mig_uuid != dead.slice.mig_uuid
    assert _granted(alloc, second.request_id) is None
    container.reload()
    assert container.status == "running"

    agent.tick()  # fences the old container, then settles its slice
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    got = _granted(alloc, second.request_id)
    assert got is not None and got.slice.mig_uuid == dead.slice.mig_uuid
    assert check_events(alloc.events()).violations == []


def test_a_node_without_a_fencing_agent_hands_an_expired_slice_over_at_once(alloc, clock):
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
    alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=600))
    dead = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=10))
    queued = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=60), wait=True)
    clock.advance(11)
    alloc.reap()
    granted = _granted(alloc, queued.request_id)
    assert granted is not None and granted.slice.id == dead.slice.id
    assert not [e for e in alloc.events() if e["type"].startswith("slice.")]


def test_the_checker_flags_a_grant_of_a_slice_still_awaiting_its_fence():
    events = [
        {"type": "lease.granted", "lease": "a", "slice": "s1", "fence": "1"},
        {"type": "lease.expired", "lease": "a", "slice": "s1", "fence": "1"},
        {"type": "slice.quarantined", "slice": "s1", "lease": "a"},
        {"type": "lease.granted", "lease": "b", "slice": "s1", "fence": "2"},
    ]
    assert check_events(events).violations == [
        "slice s1 granted to b before the container of expired lease a was confirmed gone"
    ]
    settled = events[:3] + [{"type": "slice.settled", "slice": "s1", "lease": "a", "by": "agent"}] + events[3:]
    assert check_events(settled).violations == []
