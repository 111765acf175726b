"""A task container counts as removed only once the engine no longer has it: a removal that finds
another one under way (the engine's 409, "removal ... is already in progress": the node agent
fencing it while its runner cleans up) waits, within a bound, for that one to finish, and answers
"not confirmed" otherwise, so its caller leaves the lease to lapse instead of releasing the slice
to the next holder while the container may still be there. Real Docker: the other removal is made
slow by a writable layer of many files, as a container that wrote much is."""

from __future__ import annotations

import threading
import time

import docker.errors
import pytest

from prefect_mig.launchers.docker import remove_container

MANY_FILES = 60_000


@pytest.fixture
def being_removed(docker_client, python_image, containers):
    """A container whose removal by another remover is under way (and takes seconds)."""
    script = (f"import os, time\nos.makedirs('/d')\nfor i in range({MANY_FILES}): open(f'/d/{{i}}', 'w').close()\n"
              "print('written', flush=True)\ntime.sleep(600)")
    container = docker_client.containers.run(python_image, ["python3", "-c", script], detach=True, network_disabled=True)
    containers.append(container)
    deadline = time.monotonic() + 300
    while b"written" not in container.logs():
        assert time.monotonic() < deadline, "the container did not write its files"
        time.sleep(0.2)
    other = threading.Thread(target=lambda: docker_client.api.remove_container(container.id, force=True), daemon=True)
    other.start()
    while docker_client.api.inspect_container(container.id)["State"]["Status"] != "removing":
        assert time.monotonic() < deadline, "the other removal did not begin"
        time.sleep(0.01)
    yield container
    other.join(timeout=120)


def test_a_container_whose_removal_is_under_way_counts_as_removed_only_once_the_engine_has_it_no_more(
    docker_client, being_removed
):
    assert remove_container(being_removed) is True
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(being_removed.id)


def test_a_container_still_there_when_the_wait_ends_is_not_confirmed_removed(docker_client, being_removed):
    assert remove_container(being_removed, gone_within_s=0.1) is False  # its caller leaves the lease to lapse
    assert docker_client.api.inspect_container(being_removed.id)["State"]["Status"] == "removing"


@pytest.fixture
def unremovable(docker_client):
    """Makes a container one the engine refuses to remove (a file of its writable layer immutable:
    the engine answers 500, "failed to remove root filesystem ... operation not permitted"), as a leaked
    mount or a busy file does; removable again after the test. Needs root beside a local overlay2 engine."""
    import os
    import shutil
    import subprocess

    made: list[str] = []

    def make(container) -> None:
        upper = docker_client.api.inspect_container(container.id)["GraphDriver"]["Data"].get("UpperDir", "")
        if os.geteuid() != 0 or not shutil.which("chattr") or not os.path.isdir(upper):
            pytest.skip("needs root on the host of a local overlay2 Docker engine (chattr on a container's layer)")
        stuck = os.path.join(upper, "stuck")
        with open(stuck, "w"):
            pass
        subprocess.run(["chattr", "+i", stuck], check=True)
        made.append(stuck)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", path], check=False)


def test_fencing_goes_on_past_a_container_the_engine_refuses_to_remove_and_settles_the_others_slices(
    redis_client, namespace, a30, docker_client, python_image, containers, unremovable, caplog
):
    """Two holders died (their leases expired) with their task containers running; the engine refuses
    to remove one of them. The agent's round still removes the other and gives its slice to the next
    holder; the slice of the one it could not remove stays quarantined, and the agent says which."""
    import logging

    from prefect_mig.agent import NodeAgent
    from prefect_mig.allocator import Allocator, SliceRequest
    from tests.agent_fixtures import start_task_container

    alloc = Allocator(redis_client, namespace)
    agent = NodeAgent(a30, alloc, node="node-a", docker_client=docker_client, heartbeat_ttl_s=60)
    agent.publish()
    leases = [alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=1)) for _ in range(2)]
    for lease in leases:  # the stuck one last: the engine lists it first
        containers.append(start_task_container(docker_client, python_image, alloc, lease_id=lease.lease_id,
                                               fence=lease.fence, mig_uuid=lease.slice.mig_uuid))
    gone, stuck = containers
    unremovable(stuck)
    time.sleep(1.5)  # both holders died: their leases expire, their containers run on
    with caplog.at_level(logging.WARNING, logger="prefect_mig.agent"):
        agent.tick()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(gone.id)
    states = alloc.slice_states([lease.slice.id for lease in leases])
    assert states == {leases[0].slice.id: "free", leases[1].slice.id: "quarantined"}
    assert f"could not remove task container {stuck.short_id} of lease {leases[1].lease_id}" in caplog.text
