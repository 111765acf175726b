"""Warm leases: a holder keeps its idle task process on the slice for its runner's next task.

Warmth never blocks anyone. ``park`` marks a lease warm only when nobody else waits for its slice
(one Lua transition, ``warm.lua``); a request that queues later for a kind a warm lease could serve,
or a re-carve that wants its range, asks the holder to hand it over (a ``handover`` push on the
lease's notice key, which `Lease` passes to its ``on_notice``). The holder then stops its container
and releases, and the slice goes to the best waiter as on any release. ``take`` reuses a warm lease
unless it was asked back meanwhile. A warm lease stays a lease: it is renewed, fenced and counted
against its tenant's quota like any other.

Timeline of a hand-over (one warm 1g slice, keep_warm 30 s)::

    t0       task A ends; park -> 'warm' (nobody waits for a 1g)
    t0+2     request B (another flow run) queues for a 1g: acquire.lua pushes 'handover' to A's lease
    t0+2.01  A's holder is told (its lease's notice wait wakes), kills its container, releases
    t0+2.4   the release hands the slice to B (the usual push to B's waiter key)

Examples:
    ```python
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.allocator.warmth import park, take
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), namespace="doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        lease = alloc.try_acquire(SliceRequest(profile="4g.24gb"))
        assert park(alloc, lease.lease_id, lease.fence) == ("warm", None)
        assert take(alloc, lease.lease_id, lease.fence) is True
    ```
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from prefect_mig.allocator.allocator import Allocator

#: what a lease's notice key carries when a warm lease is asked back
HANDOVER_NOTICE = "handover"


def park(allocator: Allocator, lease_id: str, fence: int, own_requests: Sequence[str] = ()) -> tuple[str, str | None]:
    """The holder's process on the lease is idle: keep it warm if nobody else waits for the slice.

    `own_requests` are the holder's own queued requests that could run in the same process.

    Returns:
        ``("warm", None)``: marked warm. ``("pass", request_id)``: the best waiter for the slice is
        that own request; it left the queue and its task may run in the process now (the lease
        stays busy). ``("handover", None)``: someone else waits, or the lease was revoked or its
        slice is being re-carved: stop the process and release. ``("gone", None)``: the lease ended.
    """
    reply = allocator._run("warm", lease_id, fence, "park", json.dumps(list(own_requests)), action="keep a lease warm")
    if reply[0] == "pass":
        return "pass", str(reply[1])
    return ("gone" if reply[0] == "stale" else str(reply[0])), None


def take(allocator: Allocator, lease_id: str, fence: int) -> bool:
    """Reuse a warm lease for the holder's next task; False when it was asked back (hand it over:
    stop the process, release) or is gone."""
    return allocator._run("warm", lease_id, fence, "take", "[]", action="reuse a warm lease")[0] == "ok"
