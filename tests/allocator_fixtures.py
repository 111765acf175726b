"""Fixtures for allocator tests: a fresh namespace per test on the session's real redis-server,
and a virtual clock with ``advance()``."""

from __future__ import annotations

import uuid

import pytest

from prefect_mig.allocator import Allocator, ManualClock

H100_MIXED = "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def alloc(redis_client, namespace, clock) -> Allocator:
    """An allocator on a fresh namespace, with a virtual clock, aging 60 s, a cluster grace of 5 s."""
    allocator = Allocator(redis_client, namespace, clock=clock, aging_s=60, wait_ttl_s=30, grace_s=5)
    allocator.configure_cluster(grace_s=5)
    return allocator


@pytest.fixture
def one_h100(alloc) -> Allocator:
    """One node with one H100-80GB carved 3g + 3x1g."""
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    return alloc
