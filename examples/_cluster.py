"""Shared by the examples: use the cluster PREFECT_MIG_REDIS_URL names, or make a simulated one.

With no ``PREFECT_MIG_REDIS_URL``, an example starts a private redis-server and publishes a
simulated H100-80GB (carved 3g + 3x1g) into it, so it runs on any machine with Docker.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import redis

from prefect_mig.allocator import Allocator

SIMULATED = {"node-a": ["3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"]}


@contextmanager
def cluster(namespace: str = "examples"):
    """Yield an `Allocator` on the configured cluster, or on a private simulated one."""
    if os.environ.get("PREFECT_MIG_REDIS_URL"):
        yield Allocator(redis.Redis.from_url(os.environ["PREFECT_MIG_REDIS_URL"]), os.environ.get("PREFECT_MIG_NAMESPACE", "default"))
        return
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        os.environ.update(PREFECT_MIG_REDIS_URL=server.url, PREFECT_MIG_NAMESPACE=namespace)
        try:
            alloc = Allocator(server.client(), namespace)
            alloc.publish_fleet("node-a=1xH100-80GB", layouts=SIMULATED)
            yield alloc
        finally:
            del os.environ["PREFECT_MIG_REDIS_URL"], os.environ["PREFECT_MIG_NAMESPACE"]


def wait_for_lease(tenant: str, profile: str, timeout_s: float = 60.0) -> None:
    """Block until `tenant` holds a `profile` slice on the configured cluster."""
    import time

    alloc = Allocator(redis.Redis.from_url(os.environ["PREFECT_MIG_REDIS_URL"]), os.environ.get("PREFECT_MIG_NAMESPACE", "default"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = alloc.status()
        profiles = {s["id"]: s["profile"] for s in status["slices"]}
        if any(row.get("tenant") == tenant and profiles.get(row.get("slice")) == profile for row in status["leases"]):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{tenant} never got a {profile} slice")
