"""What the fault tests share: a one-slice cluster on a server of the test's own, and holders that
write down their use of a slice in a `HolderLog`."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

from prefect_mig.allocator import LeaseClient, SliceRequest
from prefect_mig.testing.holder_log import HolderLog
from prefect_mig.testing.redis_server import RedisServer

ONE_SLICE = {"node-a": ["4g.24gb@0"]}
FLEET = "node-a=1xA30-24GB"


def cluster(server: RedisServer, namespace: str = "faults", **options) -> LeaseClient:
    client = LeaseClient(server.url, namespace, **options)
    client.allocator.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    return client


class Holder:
    """A lease held by this process that records its use: from the grant until on_lost or release."""

    def __init__(self, client: LeaseClient, log: HolderLog, request: SliceRequest, *, timeout_s: float | None = 10):
        self.lost_at: float | None = None
        self.error: Exception | None = None
        self.lost = threading.Event()
        self.log = log
        self.lease = client.acquire(request, timeout_s=timeout_s, on_lost=self._on_lost)
        self.start = time.time()

    def _on_lost(self, lease, exc) -> None:
        self.lost_at, self.error = time.time(), exc
        self.lost.set()

    def stop(self) -> None:
        end = self.lost_at if self.lost_at is not None else time.time()
        self.log.add(self.lease.slice.id, self.lease.fence, self.start, end)
        self.lease.release()


def server_time_ms(client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@contextmanager
def paused(server: RedisServer):
    """SIGSTOP the server for the block, SIGCONT after."""
    pid = server._process.pid  # noqa: SLF001 - the server process this test owns
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")
