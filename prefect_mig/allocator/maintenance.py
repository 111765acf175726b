"""Node maintenance, like ``kubectl drain`` or Slurm's ``state=drain``: stop new grants on a node,
wait for the leases held there to end (or say who holds them), and put the node back into service.

A drained node's slices get no new grants from any path (a free slice, a lease that ends, the agent
publishing again, a node coming back after its heartbeat lapsed); leases already held run on
untouched, so draining never kills work.

Examples:
    ```python
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.allocator.maintenance import drain_node, holders
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 2g.12gb@2"]})
        held = alloc.try_acquire(SliceRequest(profile="2g.12gb", holder="nightly-train"))
        left = drain_node(alloc, "node-a", wait_s=0)
        assert [row["holder"] for row in left] == ["nightly-train"]
        alloc.release(held.lease_id, held.fence)
        assert holders(alloc, "node-a") == []
        alloc.drain_node("node-a", drain=False)  # `prefect-mig node resume node-a`
    ```
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect_mig.allocator.allocator import Allocator
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.models import decode


def holders(allocator: Allocator, node: str) -> list[dict[str, Any]]:
    """The leases held on a node's slices now: lease id, holder, tenant, slice, expiry (ms)."""
    k = allocator.keys
    with redis_errors(f"read the leases on node {node}"):
        ids = sorted(decode(i) for i in allocator.redis.smembers(k.node_slices(node)))
        states = allocator.redis.hmget(k.slice_state, ids) if ids else []
    lease_ids = []
    for state in states:
        kind, _, lease_id = decode(state or "").partition("|")
        if kind == "leased":
            lease_ids.append(lease_id)
    fields = ("lease_id", "holder", "tenant", "slice", "priority", "expires_at")
    return [{f: row.get(f) for f in fields} for row in allocator._lease_rows(lease_ids)]


def drain_node(
    allocator: Allocator, node: str, *, wait_s: float = 0.0, poll_s: float = 0.5, stop: threading.Event | None = None
) -> list[dict[str, Any]]:
    """Drain `node` and wait up to `wait_s` seconds for its leases to end; returns the leases still
    held when the wait ends (empty: the node is idle and may go down). Raises `ConfigError` naming
    the node if it never published an inventory."""
    allocator.drain_node(node)
    deadline = time.monotonic() + max(0.0, wait_s)
    stop = stop or threading.Event()
    while True:
        left = holders(allocator, node)
        if not left or time.monotonic() >= deadline or stop.is_set():
            return left
        stop.wait(min(poll_s, max(0.0, deadline - time.monotonic())))


def drained_nodes(allocator: Allocator) -> list[str]:
    """The nodes drained for maintenance, sorted."""
    with redis_errors("read the drained nodes"):
        return sorted(decode(n) for n in allocator.redis.smembers(allocator.keys.drained_nodes))
