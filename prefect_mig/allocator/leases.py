"""`LeaseClient` and `Lease`: what a process uses to hold a MIG slice.

A `Lease` renews itself on a background thread every TTL/3 and watches its notice key, where a
revocation is pushed. It calls ``on_lost`` once, so the holder can stop the work that uses the
slice, when:

- the lease was revoked for a higher-priority request (at once, from the push);
- a renewal says the lease is gone, expired or owned by a newer fence;
- it cannot prove the lease alive: every renewal failed (no answer, or Redis refused: OOM, BUSY,
  READONLY, ...) and the lease could expire on the server within the safety margin. A watchdog
  fires at ``last successful renewal's start + TTL - margin``, whatever the renewal call is doing,
  so the holder is told *before* the server can hand the slice to someone else.

Timeline of a holder whose Redis stops answering (TTL 60 s, margin 5 s)::

    t0       renewal sent, succeeds: the server's expiry is at least t0 + 60
    t0+20    renewal fails, retried at shorter intervals while time is left
    t0+55    watchdog: on_lost(...) -> the holder stops its container
    t0+60    earliest moment the server may expire the lease and grant the slice again

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

import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import redis

from prefect_mig.allocator.allocator import Allocator, check_wait
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.connection import client_for_url, connect
from prefect_mig.allocator.models import LeaseInfo, SliceRecord, SliceRequest
from prefect_mig.errors import LeaseLost, LeaseNotOwned

LostCallback = Callable[["Lease", Exception], None]

#: the longest a notice wait blocks in Redis (below any client's socket timeout)
NOTICE_WAIT_S = 2.0


def safety_margin_s(ttl_s: float) -> float:
    """How long before the lease could expire on the server its holder is told it is lost: a fifth
    of the TTL, between 0.2 s and 5 s (time to stop a container, and for clocks to disagree)."""
    return min(5.0, max(0.2, ttl_s / 5))


class Lease:
    """A held slice: its identity, its fencing token, and the threads that keep it alive.

    Attributes:
        lease_id, fence, slice, mig_uuid: what was granted.
        lost: set once the lease is known (or must be assumed) to be gone.
    """

    def __init__(
        self, allocator: Allocator, info: LeaseInfo, *, on_lost: LostCallback | None = None,
        on_notice: Callable[[Lease, str], None] | None = None,
    ) -> None:
        self.allocator = allocator
        self.info = info
        self.lease_id = info.lease_id
        self.fence = info.fence
        self.slice: SliceRecord = info.slice
        self.ttl_s = info.ttl_ms / 1000
        self.margin_s = safety_margin_s(self.ttl_s)
        self.on_lost = on_lost
        self.on_notice = on_notice  # other pushes than a revocation: 'handover' (a warm lease, see warmth.py)
        self.lost = threading.Event()
        self.lost_reason: Exception | None = None
        self.renewals = 0
        self._stop = threading.Event()
        self._released = False
        self._lock = threading.Lock()
        # Until the first renewal proves better, assume the grant is as old as a whole wake-up
        # interval could make it (start_renewing renews at once and moves this on).
        self._deadline = time.monotonic() + self.ttl_s - self.margin_s - NOTICE_WAIT_S
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew-{self.lease_id[:8]}", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"lease-watch-{self.lease_id[:8]}", daemon=True)

    @property
    def mig_uuid(self) -> str:
        return self.slice.mig_uuid

    def __repr__(self) -> str:
        return f"Lease({self.lease_id[:8]}, {self.slice.profile}@{self.slice.start} on {self.slice.node}, fence={self.fence})"

    def start_renewing(self) -> Lease:
        """Renew once now (so the local deadline is measured from a renewal this process sent),
        then keep renewing in the background. A lease already lost raises here."""
        try:
            self.renew()
        except (LeaseLost, LeaseNotOwned):
            self._stop.set()
            raise
        except Exception:  # noqa: BLE001 - Redis trouble: the background thread retries until the deadline
            pass
        self._thread.start()
        self._watchdog.start()
        return self

    def renew(self) -> None:
        """Renew now (the background thread does this every TTL/3)."""
        started = time.monotonic()
        self.allocator.renew(self.lease_id, self.fence, self.ttl_s)
        self.renewals += 1
        self._deadline = max(self._deadline, started + self.ttl_s - self.margin_s)

    def confirm(self) -> None:
        """Prove the lease still held right now, just before a container starts on its slice: a
        renewal that Redis answered, and the lease not lost meanwhile. Nothing less will do: a
        lease revoked while this holder could not reach Redis keeps only the cluster's grace on the
        server, less than the local deadline, so a Redis error refuses the start too (the task
        fails; a retry takes a fresh lease). See `prefect_mig.launchers.docker.start_confirmed`.

        Raises:
            LeaseLost: revoked, expired or gone. LeaseNotOwned: another holder has it.
            RedisUnavailable: Redis did not answer the renewal.
        """
        self.renew()
        if self.lost.is_set():
            raise self.lost_reason if isinstance(self.lost_reason, LeaseLost) else LeaseLost(
                f"lease {self.lease_id} is lost; its container is not started.", reason="lost", lease_id=self.lease_id)

    def _watch(self) -> None:
        """Fire on_lost at the local deadline, even while a renewal call hangs."""
        while not self._stop.is_set() and not self.lost.is_set():
            left = self._deadline - time.monotonic()
            if left <= 0:
                why = getattr(self, "_last_error", None)
                self._mark_lost(
                    LeaseLost(
                        f"lease {self.lease_id} could not be renewed and could expire within "
                        f"{self.margin_s:g} s; stop using the slice now"
                        + (f" (last error: {why})" if why else "."),
                        reason="expired",
                        lease_id=self.lease_id,
                    )
                )
                return
            self._stop.wait(min(left, 1.0))

    def _renew_loop(self) -> None:
        next_renewal = time.monotonic() + self.ttl_s / 3
        notice = self.allocator.keys.notice(self.lease_id)
        while not self._stop.is_set() and not self.lost.is_set():
            now = time.monotonic()
            if now < next_renewal:
                try:
                    with redis_errors("watch for a revocation"):
                        pushed = self.allocator.redis.blpop([notice], timeout=min(NOTICE_WAIT_S, next_renewal - now))
                except Exception as exc:  # noqa: BLE001 - any Redis trouble: renewals decide
                    self._last_error = exc
                    self._stop.wait(min(0.2, max(0.0, next_renewal - time.monotonic())))
                    continue
                if not pushed:
                    continue
                text = pushed[1].decode() if isinstance(pushed[1], bytes) else str(pushed[1])
                if not text.startswith("revoked") and self.on_notice is not None:
                    try:
                        self.on_notice(self, text)
                    except Exception as callback_error:  # noqa: BLE001 - renewals go on
                        print(f"prefect-mig: on_notice of {self!r} failed: {callback_error!r}", file=sys.stderr)
                    continue
            started = time.monotonic()
            try:
                self.renew()
                next_renewal = started + self.ttl_s / 3
            except (LeaseLost, LeaseNotOwned) as exc:
                self._mark_lost(exc)
                return
            except Exception as exc:  # noqa: BLE001 - every Redis error: retry while time is left
                self._last_error = exc
                left = self._deadline - time.monotonic()
                next_renewal = time.monotonic() + max(0.05, min(self.ttl_s / 3, left / 3))

    def _mark_lost(self, exc: Exception) -> None:
        with self._lock:
            if self.lost.is_set() or self._stop.is_set():
                return
            self.lost_reason = exc
            self.lost.set()
        if self.on_lost is not None:
            try:
                self.on_lost(self, exc)
            except Exception as callback_error:  # noqa: BLE001 - a failing callback must not hide the loss
                print(f"prefect-mig: on_lost of {self!r} failed: {callback_error!r}", file=sys.stderr)

    def abandon(self) -> None:
        """Stop renewing without giving the slice back, for a holder that cannot confirm its use
        of the slice ended (its container's engine stopped answering). The lease lapses within its
        TTL and its slice stays quarantined until the node's agent confirms no container of the
        lease remains (or the cluster's fallback settle time passes), where a release would hand it
        on at once. A later `release` does nothing."""
        self._stop.set()
        self._released = True

    def release(self) -> bool:
        """Stop renewing and give the slice back; idempotent. False if it was already gone."""
        self._stop.set()
        if self._released:
            return False
        self._released = True
        try:
            return self.allocator.release(self.lease_id, self.fence)
        except LeaseNotOwned:
            return False


class _Handover:
    """Who releases a lease granted to an async acquire: its waiting thread, if the awaiting task
    was cancelled before the grant came, else the task (exactly one of them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._lease: Lease | None = None

    def give(self, lease: Lease) -> bool:
        """False when the task is gone: the caller keeps (and releases) the lease."""
        with self._lock:
            if not self._abandoned:
                self._lease = lease
            return not self._abandoned

    def abandon(self) -> Lease | None:
        """The lease handed over before the task was cancelled, if any (the task releases it)."""
        with self._lock:
            self._abandoned = True
            return self._lease


class LeaseClient:
    """Acquire, hold and release leases on MIG slices (sync).

    Args:
        client: a ``redis.Redis``, or a Redis URL.
        namespace: the cluster's namespace.
        connection_options: with a URL, more options for `client_for_url` (TLS files, the
            Sentinels' credentials: `prefect_mig.allocator.connection.url_options`).
        allocator_options: passed to `Allocator` (clock, aging_s, wait_ttl_s, grace_s).
    """

    def __init__(
        self, client: redis.Redis | str, namespace: str = "default", *, connection_options: dict | None = None, **allocator_options
    ) -> None:
        if isinstance(client, str):
            client = client_for_url(client, socket_connect_timeout=2.0, socket_timeout=5.0, **(connection_options or {}))
        self.allocator = Allocator(client, namespace, **allocator_options)

    @classmethod
    def from_settings(cls, settings=None) -> LeaseClient:
        """A client of the cluster the ``PREFECT_MIG_*`` settings name: its Redis, or with no
        ``PREFECT_MIG_REDIS_URL`` the embedded default's private redis-server under
        ``PREFECT_MIG_STATE_DIR`` (started if it is not running), the one the CLI and `MigTaskRunner` use."""
        from prefect_mig.settings import load_settings

        settings = settings or load_settings()
        return cls(
            connect(settings, socket_connect_timeout=2.0, socket_timeout=5.0), settings.namespace, max_ttl_s=settings.lease_max_ttl_s,
            replicas=settings.redis_replicas, replica_timeout_s=settings.redis_replica_timeout_s,
            wait_ttl_s=settings.wait_ttl_s,
        )

    def acquire(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None,
        stop: threading.Event | None = None,
    ) -> Lease:
        """Wait (pushed) for a slice and start renewing it. Release it with `Lease.release`.
        `stop` (set from another thread) ends the wait as a timeout would, within 2 s.

        Raises:
            WaitTimeout, NoCapacity (timeout 0), Unsatisfiable, RedisUnavailable.
        """
        info = self.allocator.acquire(request, timeout_s=timeout_s, stop=stop)
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

    @classmethod
    def from_settings(cls, settings=None) -> AsyncLeaseClient:
        """The cluster the ``PREFECT_MIG_*`` settings name, as `LeaseClient.from_settings` finds it
        (with no ``PREFECT_MIG_REDIS_URL``: the embedded default's redis-server)."""
        client = cls.__new__(cls)
        client._sync = LeaseClient.from_settings(settings)
        client.allocator = client._sync.allocator
        return client

    async def acquire(
        self, request: SliceRequest, *, timeout_s: float | None = None, on_lost: LostCallback | None = None
    ) -> Lease:
        """Wait (pushed) for a slice and start renewing it; `LeaseClient.acquire` for asyncio.

        The wait runs on a thread of its own, not on the loop's default executor: waiters beyond
        that pool's size would hold every thread of it, and the holders' releases, which need one,
        would never run. A cancellation, whenever it lands, leaves nothing held or queued: the
        request is withdrawn, and a lease granted meanwhile is released."""
        import asyncio

        timeout_s = check_wait(timeout_s)
        stop = threading.Event()
        handover = _Handover()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Lease] = loop.create_future()

        def settle(outcome: Lease | BaseException | None) -> None:
            if done.done():
                return
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

        def wait() -> None:
            outcome: Lease | BaseException | None
            try:
                outcome = self._sync.acquire(request, timeout_s=timeout_s, on_lost=on_lost, stop=stop)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                outcome = exc
            else:
                if not handover.give(outcome):  # its task was cancelled meanwhile
                    outcome.release()
                    outcome = None
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop closed: its tasks were cancelled, so the lease is ours
                if isinstance(outcome, Lease):
                    outcome.release()

        threading.Thread(target=wait, name="lease-wait", daemon=True).start()
        try:
            lease = await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            lease = handover.abandon()  # None: the thread withdraws the request, or releases a late grant
            if lease is not None:
                await asyncio.shield(asyncio.to_thread(lease.release))
            else:  # before the task ends, so a program that exits next leaves nothing queued
                await asyncio.wait({done})
                if not done.cancelled():
                    done.exception()  # the WaitTimeout that stopping produces: seen, not logged as unretrieved
            raise
        assert lease is not None  # None only once the task is cancelled
        return lease

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
