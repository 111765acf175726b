"""Warm slots: a lease and its warm task container, kept for the next task of the same runner.

A slot is (`Lease`, `WarmContainer`) under a key chosen by the caller (the task runner's
configuration, the slice request and the sharing scope, e.g. the flow run). When a call ends well,
`WarmPool.finish` asks the allocator what happens to the slice (``warmth.park``, one Lua transition):

- the best waiter for the slice is one of this pool's own queued requests of the same key: the slot
  passes to it directly (its request leaves the queue; the lease stays busy);
- someone else waits for it: the container is stopped and the lease released (hand-over);
- nobody waits: the slot is kept warm for `keep_warm_s`, then stopped and released. Meanwhile a
  ``handover`` push on the lease (a request that could use the slice queued, or a re-carve wants
  it) stops and releases it at once, and `take` reuses it for the next call of the same key.

A slot whose call failed, was stopped or whose lease is lost is never kept: it is stopped, then
its lease released (the container first, so the slice is never used by two holders).

A key's first item is its scope (e.g. ``("flow-run", id)``). `end_scope` stops the idle slots of a
scope that ended (its flow run did) at once, and a slot of that scope whose call ends later is not
kept either.

Examples:
    ```python
    from prefect_mig.launchers.warm_pool import WarmPool

    pool = WarmPool()
    assert pool.take(("flow-run-1", "1g.10gb"), keep_warm_s=30) is None
    pool.close()
    ```
"""

from __future__ import annotations

import atexit
import math
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prefect_mig.allocator import Lease
from prefect_mig.allocator.warmth import HANDOVER_NOTICE, park, take
from prefect_mig.errors import PrefectMigError
from prefect_mig.launchers.warm import WarmContainer


@dataclass(eq=False)
class WarmSlot:
    """A held lease and the warm container running on its slice."""

    key: Hashable
    lease: Lease
    container: WarmContainer
    keep_warm_s: float = 30.0
    idle_since: float | None = None
    expires_at: float = math.inf  # while idle: when it is stopped and released


@dataclass(eq=False)
class LocalWaiter:
    """A queued request of this process that a finishing slot of its key may be passed to."""

    key: Hashable
    request_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    slot: WarmSlot | None = None


class WarmPool:
    """Idle warm slots by key, and this process's queued requests that could take one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[WarmSlot]] = {}
        self._waiters: dict[Hashable, list[LocalWaiter]] = {}
        self._by_lease: dict[str, WarmSlot] = {}
        self._ended: dict[Hashable, float] = {}  # scope -> when it ended (kept an hour)
        self._expiry = threading.Condition(self._lock)  # wakes the reaper when a slot turns idle
        self._reaper: threading.Thread | None = None  # one thread lapses every idle slot in time

    def take(self, key: Hashable, *, keep_warm_s: float) -> WarmSlot | None:
        """An idle slot of `key`, taken back into use; None when there is none (or each one was
        asked back meanwhile, or its process ended while idle: those are stopped and released)."""
        while True:
            with self._lock:
                slots = self._idle.get(key) or []
                slot = slots.pop() if slots else None
            if slot is None:
                return None
            try:
                # a process that ended while idle (an engine restart, the OOM killer) is not handed out
                ok = not slot.lease.lost.is_set() and slot.container.serving() and take(
                    slot.lease.allocator, slot.lease.lease_id, slot.lease.fence
                )
            except PrefectMigError:
                ok = False
            if ok:
                slot.idle_since, slot.keep_warm_s = None, keep_warm_s
                return slot
            self.discard(slot)

    def adopt(self, key: Hashable, lease: Lease, container: WarmContainer, *, keep_warm_s: float) -> WarmSlot:
        """A new slot for a lease just granted and its freshly started container."""
        slot = WarmSlot(key=key, lease=lease, container=container, keep_warm_s=keep_warm_s)
        with self._lock:
            self._by_lease[lease.lease_id] = slot
        return slot

    @contextmanager
    def waiting(self, key: Hashable, request_id: str) -> Iterator[LocalWaiter]:
        """While inside, a finishing slot of `key` may be passed to `request_id` (see
        `LocalWaiter`: its ``stop`` is set and its ``slot`` filled); leaving is atomic with that."""
        waiter = LocalWaiter(key=key, request_id=request_id)
        with self._lock:
            self._waiters.setdefault(key, []).append(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                self._waiters[key].remove(waiter)
                unused, waiter.slot = waiter.slot, None
            if unused is not None:  # passed to a wait that ended otherwise (an error, a timeout)
                self.discard(unused)

    def claim_passed(self, waiter: LocalWaiter) -> WarmSlot | None:
        """The slot passed to `waiter` (now the caller's), or None. Under the pool's lock, so a
        wait that ended while a slot was being passed to it sees the slot."""
        with self._lock:
            slot, waiter.slot = waiter.slot, None
        return slot

    def finish(self, slot: WarmSlot, *, reusable: bool) -> None:
        """A call on `slot` ended: pass it on, keep it warm, or stop and release it."""
        if not reusable or slot.lease.lost.is_set() or slot.container.broken:
            self.discard(slot)
            return
        allocator = slot.lease.allocator
        with self._lock:  # end_scope marks its scope under this lock, then closes what is idle
            own = {w.request_id: w for w in self._waiters.get(slot.key, []) if w.slot is None}
            try:
                if _scope(slot.key) in self._ended:  # its flow run is over: nothing to keep it for
                    verdict, request_id = "ended", None
                else:
                    verdict, request_id = park(allocator, slot.lease.lease_id, slot.lease.fence, list(own))
            except PrefectMigError:
                verdict, request_id = "gone", None
            if verdict == "pass" and request_id in own:
                waiter = own[request_id]
                waiter.slot = slot
                waiter.stop.set()
                try:  # wake its wait at once (it sees `stop` and returns); one round trip
                    wake = allocator.redis.pipeline(transaction=False)
                    wake.rpush(allocator.keys.waiter(request_id), "warm")
                    wake.pexpire(allocator.keys.waiter(request_id), 60_000)
                    wake.execute()
                except Exception:  # noqa: BLE001 - the wait wakes by itself within its interval
                    pass
                return
            if verdict == "warm":
                slot.idle_since = time.monotonic()
                slot.expires_at = slot.idle_since + slot.keep_warm_s
                self._idle.setdefault(slot.key, []).append(slot)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, daemon=True, name="warm-reaper")
                    self._reaper.start()
                self._expiry.notify()
                return
        self.discard(slot)

    def open_scope(self, scope: Hashable) -> None:
        """`scope` runs (again: a flow run's retry keeps its id): its slots may be kept warm."""
        with self._lock:
            self._ended.pop(scope, None)

    def end_scope(self, scope: Hashable) -> int:
        """`scope` ended: stop and release its idle slots now, and keep none of its slots whose call
        is still running; returns how many were stopped."""
        now = time.monotonic()
        with self._lock:
            for old in [s for s, at in self._ended.items() if now - at > _ENDED_KEPT_S]:
                del self._ended[old]
            self._ended[scope] = now
        return self.close(lambda key: _scope(key) == scope)

    def notice(self, lease: Lease, text: str) -> None:
        """`Lease.on_notice`: a warm lease asked back is stopped and released at once."""
        if text == HANDOVER_NOTICE:
            self._drop_idle(self._by_lease.get(lease.lease_id))

    def lost(self, lease: Lease, exc: Exception) -> None:
        """`Lease.on_lost` for an idle slot: stop its container now (a busy one is stopped by its call)."""
        self._drop_idle(self._by_lease.get(lease.lease_id))

    def _reap(self) -> None:
        """Stop and release each idle slot once its `keep_warm_s` has passed."""
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    idle = [s for slots in self._idle.values() for s in slots]
                    due = [s for s in idle if s.expires_at <= now]
                    if due:
                        break
                    self._expiry.wait(min((s.expires_at for s in idle), default=now + 3600) - now)
                for s in due:
                    self._idle[s.key].remove(s)
            for s in due:
                self.discard(s)

    def _drop_idle(self, slot: WarmSlot | None) -> None:
        if slot is None:
            return
        with self._lock:
            slots = self._idle.get(slot.key) or []
            if slot not in slots:
                return  # busy (or already gone): its call's end decides
            slots.remove(slot)
        threading.Thread(target=self.discard, args=(slot,), daemon=True, name="warm-discard").start()

    def discard(self, slot: WarmSlot) -> None:
        """Stop the slot's container, then release its lease; a container whose removal the
        engine did not confirm leaves its lease to lapse instead (`Lease.abandon`)."""
        with self._lock:
            self._by_lease.pop(slot.lease.lease_id, None)
        try:
            stopped = slot.container.stop()
        except Exception:  # noqa: BLE001 - the node agent fences a container whose lease ended
            stopped = False
        if not stopped:
            slot.lease.abandon()
            return
        try:
            slot.lease.release()
        except PrefectMigError:
            pass  # Redis trouble: the lease expires by itself

    def idle(self, key: Hashable | None = None) -> list[WarmSlot]:
        """The idle slots (of `key`)."""
        with self._lock:
            return [s for k, slots in self._idle.items() if key is None or k == key for s in slots]

    def close(self, match=lambda key: True) -> int:
        """Stop and release the idle slots whose key `match` accepts; returns how many."""
        with self._lock:
            doomed = [s for k, slots in self._idle.items() if match(k) for s in slots]
            for k in [k for k in self._idle if match(k)]:
                self._idle[k] = []
        for s in doomed:
            self.discard(s)
        return len(doomed)


_ENDED_KEPT_S = 3600.0  # a call still running an hour after its scope ended may park its slot (until keep_warm_s)


def _scope(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else key


#: The process's pool (task runners share it: a runner duplicated per flow run finds its slots).
POOL = WarmPool()
atexit.register(POOL.close)
