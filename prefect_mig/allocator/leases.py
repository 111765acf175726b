"""`LeaseClient` and `Lease`: what a process uses to hold a MIG slice.

A `Lease` renews itself on a background thread every TTL/3. If it cannot renew before its TTL runs
out (Redis unreachable, the process was paused, the lease was revoked for a higher-priority
request), it calls ``on_lost`` once, so the holder can stop the work that uses the slice: after that
moment another holder may own it, and the fencing token proves who does.

Timeline of a holder paused past its TTL (SIGSTOP)::

    t0       granted (fence 7), renewals every TTL/3
    t1       process paused
    t1+TTL   lease expires in Redis; the next acquire reaps it and grants the slice (fence 8)
    t2       process resumes; its renewal presents fence 7 -> LeaseLost -> on_lost(...)
             and its release with fence 7 frees nothing (the lease is gone)

Examples:
    ```python
    from prefect_mig.allocator import LeaseClient, SliceRequest
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        client = LeaseClient(server.client(), namespace="doc")
        client.allocator.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
        with client.lease(SliceRequest(profile="7g.80gb", priority=5)) as lease:
            assert lease.mig_uuid.startswith("MIG-")
        assert client.allocator.status()["leases"] == []
    ```
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import redis

from prefect_mig.allocator.allocator import Allocator
from prefect_mig.allocator.models import LeaseInfo, SliceRecord, SliceRequest
from prefect_mig.errors import LeaseLost, LeaseNotOwned, RedisUnavailable

LostCallback = Callable[["Lease", Exception], None]


class Lease:
    """A held slice: its identity, its fencing token, and the thread that keeps it alive.

    Attributes:
        lease_id, fence, slice, mig_uuid: what was granted.
        lost: set once the lease is known (or must be assumed) to be gone.
    """

    def __init__(self, allocator: Allocator, info: LeaseInfo, *, on_lost: LostCallback | None = None) -> None:
        self.allocator = allocator
        self.info = info
        self.lease_id = info.lease_id
        self.fence = info.fence
        self.slice: SliceRecord = info.slice
        self.ttl_s = info.ttl_ms / 1000
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.lost_reason: Exception | None = None
        self._stop = threading.Event()
        self._released = False
        # The local deadline is measured from before the grant reached us, so it errs early.
        self._deadline = time.monotonic() + self.ttl_s
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew-{self.lease_id[:8]}", daemon=True)

    @property
    def mig_uuid(self) -> str:
        return self.slice.mig_uuid

    def __repr__(self) -> str:
        return f"Lease({self.lease_id[:8]}, {self.slice.profile}@{self.slice.start} on {self.slice.node}, fence={self.fence})"

    def start_renewing(self) -> Lease:
        self._thread.start()
        return self

    def renew(self) -> None:
        """Renew now (the background thread does this every TTL/3)."""
        self.allocator.renew(self.lease_id, self.fence, self.ttl_s)
        self._deadline = time.monotonic() + self.ttl_s

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            started = time.monotonic()
            try:
                self.allocator.renew(self.lease_id, self.fence, self.ttl_s)
                self._deadline = started + self.ttl_s
            except (LeaseLost, LeaseNotOwned) as exc:
                self._mark_lost(exc)
                return
            except RedisUnavailable as exc:
                if time.monotonic() >= self._deadline:
                    self._mark_lost(
                        LeaseLost(
                            f"lease {self.lease_id} could not be renewed before its TTL ran out: {exc}",
                            reason="expired",
                            lease_id=self.lease_id,
                        )
                    )
                    return
                interval = min(interval, max(0.05, (self._deadline - time.monotonic()) / 3))

    def _mark_lost(self, exc: Exception) -> None:
        if self.lost.is_set() or self._stop.is_set():
            return
        self.lost_reason = exc
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(self, exc)

    def release(self) -> bool:
        """Stop renewing and give the slice back; idempotent. False if it was already gone."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl_s)
        if self._released:
            return False
        self._released = True
        try:
            return self.allocator.release(self.lease_id, self.fence)
        except LeaseNotOwned:
            return False


class LeaseClient:
    """Acquire, hold and release leases on MIG slices (sync).

    Args:
        client: a ``redis.Redis``, or a Redis URL.
        namespace: the cluster's namespace.
        allocator_options: passed to `Allocator` (clock, aging_s, wait_ttl_s, grace_s).
    """

    def __init__(self, client: redis.Redis | str, namespace: str = "default", **allocator_options) -> None:
        if isinstance(client, str):
            client = redis.Redis.from_url(client, socket_connect_timeout=2.0, socket_timeout=5.0)
        self.allocator = Allocator(client, namespace, **allocator_options)

    @classmethod
    def from_settings(cls, settings=None) -> LeaseClient:
        from prefect_mig.errors import ConfigError
        from prefect_mig.settings import load_settings

        settings = settings or load_settings()
        if not settings.redis_url:
            raise ConfigError(
                "PREFECT_MIG_REDIS_URL is not set: point it at the cluster's Redis "
                "(e.g. redis://localhost:6379/0).",
                field="redis_url",
            )
        return cls(settings.redis_url, settings.namespace)

    def acquire(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None
    ) -> Lease:
        """Wait (pushed) for a slice and start renewing it. Release it with `Lease.release`.

        Raises:
            WaitTimeout, NoCapacity (timeout 0), Unsatisfiable, RedisUnavailable.
        """
        info = self.allocator.acquire(request, timeout_s=timeout_s)
        return Lease(self.allocator, info, on_lost=on_lost).start_renewing()

    @contextmanager
    def lease(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None
    ) -> Iterator[Lease]:
        """``with client.lease(SliceRequest(profile="1g.10gb")) as lease:`` -- released on every exit."""
        held = self.acquire(request, timeout_s=timeout_s, on_lost=on_lost)
        try:
            yield held
        finally:
            held.release()


class AsyncLeaseClient:
    """The asyncio face of `LeaseClient`: ``async with client.lease(request) as lease:``.

    Redis calls run in worker threads (the same Lua transitions as the sync client); a cancelled
    task withdraws its request, and a grant that races the cancellation is released.

    Examples:
        ```python
        import asyncio
        from prefect_mig.allocator import AsyncLeaseClient, SliceRequest
        from prefect_mig.testing.redis_server import RedisServer

        async def main(url):
            client = AsyncLeaseClient(url, namespace="doc-async")
            client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
            async with client.lease(SliceRequest(profile="4g.24gb")) as lease:
                return lease.slice.profile

        with RedisServer() as server:
            assert asyncio.run(main(server.url)) == "4g.24gb"
        ```
    """

    def __init__(self, client: redis.Redis | str, namespace: str = "default", **allocator_options) -> None:
        self._sync = LeaseClient(client, namespace, **allocator_options)
        self.allocator = self._sync.allocator

    async def acquire(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None
    ) -> Lease:
        import asyncio

        from prefect_mig.allocator.allocator import Queued

        got = await asyncio.to_thread(self.allocator.try_acquire, request, wait=timeout_s != 0)
        if isinstance(got, Queued):
            stop = threading.Event()
            waiting = asyncio.ensure_future(
                asyncio.to_thread(
                    self.allocator.wait_for_grant, got.request_id, timeout_s, stop=stop, request=request
                )
            )
            try:
                got = await asyncio.shield(waiting)
            except asyncio.CancelledError:
                stop.set()
                try:
                    await waiting  # withdraws the request, releases a grant that raced us
                except Exception:  # noqa: BLE001 - the WaitTimeout that stopping produces
                    pass
                raise
        return Lease(self.allocator, got, on_lost=on_lost).start_renewing()

    async def release(self, lease: Lease) -> bool:
        import asyncio

        return await asyncio.to_thread(lease.release)

    @asynccontextmanager
    async def lease(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None
    ) -> AsyncIterator[Lease]:
        held = await self.acquire(request, timeout_s=timeout_s, on_lost=on_lost)
        try:
            yield held
        finally:
            await self.release(held)
