"""A real uvicorn serving the lease API on a free port, over the session's redis-server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from prefect_mig.allocator import Allocator
from prefect_mig.allocator.tokens import TokenStore
from prefect_mig.api import create_app

from .allocator_fixtures import H100_MIXED

ADMIN_TOKEN = "an-admin-token-of-some-length"


@dataclass
class ServedApi:
    url: str
    port: int
    alloc: Allocator
    tokens: TokenStore

    def client(self, token: str | None = ADMIN_TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api_settings() -> dict:
    """Keyword arguments for `create_app` (override in a test module to change them)."""
    return {}


@pytest.fixture
def api_allocator_options() -> dict:
    """Keyword arguments for the served API's `Allocator` (override to change them)."""
    return {"wait_ttl_s": 30, "grace_s": 5}


@pytest.fixture
def served_api(redis_client, namespace, api_settings, api_allocator_options) -> Iterator[ServedApi]:
    """The API (admin token `ADMIN_TOKEN`) on 127.0.0.1, one H100 carved 3g+2g+1g+1g, real clock."""
    alloc = Allocator(redis_client, namespace, **api_allocator_options)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(alloc, token=ADMIN_TOKEN, **api_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    yield ServedApi(f"http://127.0.0.1:{port}", port, alloc, TokenStore(redis_client, namespace))
    server.should_exit = True
    thread.join(30)
