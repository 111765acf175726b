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
