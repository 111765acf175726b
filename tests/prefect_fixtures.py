"""Fixtures for Prefect tests: one temporary Prefect API for the session, and a cluster (a fresh
namespace on the session's redis-server with a simulated H100 published) that checks nothing was
left behind. Registered once in conftest.py, so every module shares the same API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import docker.errors
import pytest
import redis

from prefect_mig.allocator import Allocator
from prefect_mig.launchers.docker import task_containers

from .allocator_fixtures import H100_MIXED

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Subprocesses (the CLI, `prefect block register`, the demo) start temporary Prefect APIs of their
# own; on a loaded 2-core machine the 20 s default is not always enough.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(autouse=True)
def _prefect_run_context_left_behind(request):
    """Name the test that leaves a Prefect flow or task run context set in the test process (a later
    test's events would then carry a stranger run): a warning in the run's summary, not a failure,
    until the one known leak in the full suite is found."""
    yield
    import warnings

    from prefect.context import FlowRunContext, TaskRunContext

    for kind in (FlowRunContext, TaskRunContext):
        left = kind.get()
        if left is not None:
            run = getattr(left, "flow_run", None) or getattr(left, "task_run", None)
            warnings.warn(f"{request.node.nodeid} left a {kind.__name__} set ({getattr(run, 'name', run)!r})", stacklevel=1)


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


PREFECT_IMAGE = "prefect-mig-flow:test"


@pytest.fixture(scope="session")
def prefect_image(docker_client, python_image) -> str:
    """An image with the host's Prefect, built by the command users run (``prefect-mig image build``,
    offline; once per engine and Prefect version: it takes a minute)."""
    import prefect

    try:
        labels = docker_client.images.get(PREFECT_IMAGE).labels
        if labels.get("prefect-mig.prefect-version") == prefect.__version__ and labels.get("prefect-mig.flow-image") == "2":
            return PREFECT_IMAGE  # "2": its sources are compiled
    except docker.errors.ImageNotFound:
        pass
    cli = Path(sys.executable).parent / "prefect-mig"
    subprocess.run([str(cli), "image", "build", "--tag", PREFECT_IMAGE], check=True, timeout=600)
    return PREFECT_IMAGE


@pytest.fixture
def cluster(prefect_api, redis_server, namespace, monkeypatch, python_image, docker_client):
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    monkeypatch.setenv("PREFECT_MIG_BACKEND", "simulated")
    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    yield alloc
    leftovers = task_containers(docker_client, cluster_id=alloc.cluster_id(), namespace=namespace)
    assert leftovers == [], "a task container was left behind"
    assert alloc.status()["leases"] == [], "a lease was left behind"


def read_lease_events(flow_run_id, wanted: int, timeout_s: float = 120.0) -> list:
    """The prefect-mig.lease.* events related to a flow run, oldest first, once `wanted` arrived."""
    return read_events("prefect-mig.lease.", wanted, related=f"prefect.flow-run.{flow_run_id}", timeout_s=timeout_s)


def read_events(
    name_prefix: str, wanted: int, *, related: str | None = None, resources: list[str] | None = None,
    timeout_s: float = 120.0,
) -> list:
    """The events named `name_prefix`... of the last hour, related to `related` and/or about one of
    `resources`, oldest first, once `wanted` arrived (or `timeout_s` passed)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventRelatedFilter,
        EventResourceFilter,
    )

    filt = EventFilter(
        event=EventNameFilter(prefix=[name_prefix]),
        related=EventRelatedFilter(id=[related]) if related else None,
        resource=EventResourceFilter(id=resources) if resources else None,
        occurred=EventOccurredFilter(since=datetime.now(timezone.utc) - timedelta(hours=1)),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            events = list(client.read_events(filter=filt, limit=50).events)
            if len(events) >= wanted or time.monotonic() > deadline:
                return sorted(events, key=lambda e: e.occurred)
            time.sleep(1)


def read_task_run_states(task_run_id, until, timeout_s: float = 60.0) -> list:
    """The task run's states as the API recorded them, oldest first, once `until(states)` holds (or
    `timeout_s` passed). Prefect 3 records a task run's states from events, a moment after they
    happen: a read right after the flow returned can miss the last ones (CI once saw 'Running' last)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = sorted(client.read_task_run_states(task_run_id), key=lambda s: s.timestamp)
            if until(states) or time.monotonic() > deadline:
                return states
            time.sleep(0.3)
