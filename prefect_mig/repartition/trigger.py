"""When the repartitioning service plans next: on the transitions that change what it would plan,
else every interval.

A round of the service is cheap but a fixed interval makes a freed GPU wait for the next tick.
`Trigger` wakes the service early on the allocator's own events stream (so it works without any
Prefect server): a lease ending (``lease.released|expired|revoked``), a lease parked warm (its
slice counts as idle to the planner), a request joining the queue, a node's slices changing
(``inventory.published``, ``node.back|lost``). A burst of such events makes one round: after the
first, the trigger waits `debounce_s` more for the rest. Anything else can wake it as well with
`poke` (the CLI pokes it on Prefect's flow-run end events where a Prefect API is configured: the
time between pipeline runs is when re-carving costs nothing, DESIGN.md decision 6).

Examples:
    ```python
    import threading

    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.repartition.trigger import Trigger
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("n=1xA30-24GB", layouts={"n": ["4g.24gb@0"]})
        trigger = Trigger(alloc, debounce_s=0.1)
        assert trigger.wait(0.2) is None  # nothing happened: the interval passed
        lease = alloc.try_acquire(SliceRequest(profile="4g.24gb"))
        alloc.release(lease.lease_id, lease.fence)
        assert trigger.wait(5) == "lease.released"
    ```
"""

from __future__ import annotations

import threading
import time

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.models import decode

#: allocator events after which the planner may plan something else
TRIGGER_EVENTS = frozenset({
    "lease.released", "lease.expired", "lease.revoked", "lease.warm", "lease.queued",
    "inventory.published", "node.back", "node.lost",
})

_BLOCK_S = 0.5  # one XREAD blocks at most this long, so `poke` and `stop` are seen that soon


class Trigger:
    """Waits for the next reason to plan (see the module's docstring).

    Args:
        allocator: the cluster whose events stream it follows (from the moment it is made).
        debounce_s: after the first triggering event, gather more for this long.
        kinds: the event types that trigger (default `TRIGGER_EVENTS`).
    """

    def __init__(self, allocator: Allocator, *, debounce_s: float = 1.0, kinds: frozenset[str] = TRIGGER_EVENTS) -> None:
        self.allocator = allocator
        self.debounce_s = debounce_s
        self.kinds = kinds
        self._poked: str | None = None
        self._lock = threading.Lock()
        with redis_errors("read the events stream"):
            newest = allocator.redis.xrevrange(allocator.keys.events, count=1)
        self._last = decode(newest[0][0]) if newest else "0-0"

    def poke(self, why: str) -> None:
        """Wake a `wait` under way (or the next one) now, thread-safe; `why` is what it returns."""
        with self._lock:
            self._poked = self._poked or why

    def wait(self, timeout_s: float, stop: threading.Event | None = None) -> str | None:
        """Block until a triggering event (then `debounce_s` more), a `poke`, `stop`, or `timeout_s`.
        Returns the first triggering event's type or the poke's reason, None when none came."""
        deadline = time.monotonic() + timeout_s
        why = None
        while why is None:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                return None
            why = self._take_poke() or self._read(min(left, _BLOCK_S))
        settle = time.monotonic() + self.debounce_s
        while (left := settle - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
            self._read(min(left, _BLOCK_S))  # the rest of the burst: one round for all of it
        self._take_poke()
        return why

    def _take_poke(self) -> str | None:
        with self._lock:
            why, self._poked = self._poked, None
        return why

    def _read(self, block_s: float) -> str | None:
        """Read what the stream got since the last read (blocking up to `block_s`); the first
        triggering event's type, or None."""
        with redis_errors("read the events stream"):
            got = self.allocator.redis.xread({self.allocator.keys.events: self._last}, count=500, block=max(1, int(block_s * 1000)))
        first = None
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                self._last = decode(entry_id)
                kind = decode(fields.get(b"type", fields.get("type", b"")))
                if first is None and kind in self.kinds:
                    first = kind
        return first
