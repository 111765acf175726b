"""The HTTP lease API when Redis fails under a waiting acquire: the client is told, and the request
leaves the queue once Redis answers again, so no slice is later handed to a client that has gone."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import redis
import uvicorn

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.api import create_app

from .helpers import FLEET, ONE_SLICE, paused, wait_until

TOKEN = "an-admin-token-of-some-length"


def _serve(alloc: Allocator) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(alloc, token=TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started, 30, "uvicorn to start")
    return server, f"http://127.0.0.1:{port}"


def test_a_wait_that_redis_failed_under_leaves_the_queue_and_is_never_granted_later(fresh_redis_server, namespace):
    # it answered 503 and left its request queued: once Redis was back, the next free slice was
    # handed to a client that had gone, and the request stood ahead of real waiters until its timeout
    client = redis.Redis(host="127.0.0.1", port=fresh_redis_server.port, socket_connect_timeout=1, socket_timeout=1)
    alloc = Allocator(client, namespace, wait_ttl_s=30)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    held = alloc.try_acquire(SliceRequest(profile="4g.24gb", holder="holder"))
    server, url = _serve(alloc)
    replies: list[httpx.Response] = []
    try:
        def ask() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
                replies.append(http.post("/v1/leases", json={"request": {"profile": "4g.24gb", "holder": "waiter"},
                                                             "timeout_s": 60}))

        asking = threading.Thread(target=ask)
        asking.start()
        wait_until(lambda: alloc.status()["queue"], 10, "the acquire to queue")
        with paused(fresh_redis_server):
            asking.join(20)  # its wait's reads time out: the client is answered while Redis is still stopped
        assert replies and replies[0].status_code == 503, [r.text for r in replies]
        assert replies[0].json()["error"] == "RedisUnavailable"
        wait_until(lambda: not alloc.status()["queue"], 10, "the failed wait's request to leave the queue")
        assert alloc.release(held.lease_id, held.fence)
        time.sleep(0.5)
        granted = [e for e in alloc.events() if e.get("type") == "lease.granted" and "waiter" in e.get("holder", "")]
        assert granted == [], "a slice was handed to the client that had been told its wait failed"
        assert alloc.status()["leases"] == []
    finally:
        server.should_exit = True


def test_a_503_for_a_refusing_redis_says_why_in_the_servers_log_and_not_to_the_client(fresh_redis_server, namespace, caplog):
    # the client was told "did not answer" and the server logged nothing: a full Redis looked like a down one
    from fastapi.testclient import TestClient

    client = fresh_redis_server.client()
    alloc = Allocator(client, namespace)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    http = TestClient(create_app(alloc, token=TOKEN))
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        with caplog.at_level("WARNING", logger="prefect_mig.api"):
            refused = http.post("/v1/leases", json={"request": {"profile": "4g.24gb"}, "timeout_s": 0},
                                headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        client.config_set("maxmemory", 0)
    assert refused.status_code == 503
    assert "refused" in refused.json()["detail"] and "OOM" not in refused.text
    assert str(fresh_redis_server.port) not in refused.text
    logged = [r.getMessage() for r in caplog.records if r.name == "prefect_mig.api"]
    assert any("POST /v1/leases answered 503" in m and "maxmemory" in m for m in logged), logged
    assert alloc.status()["leases"] == []


def test_a_grant_whose_client_left_while_redis_was_down_is_released_once_it_is_back(fresh_redis_server, namespace):
    # the release of the grant nobody would read failed, and once Redis was back (its AOF replayed) the
    # lease was held by nobody for its TTL (900 s)
    from tests.test_api import _post_through_asgi

    alloc = Allocator(fresh_redis_server.client(socket_connect_timeout=0.5, socket_timeout=0.5), namespace)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE, heartbeat_ttl_s=600)
    alloc.redis.config_set("appendfsync", "always")  # the grant outlives the crash below
    stopped = threading.Event()

    async def gone_as_redis_stops() -> dict:
        fresh_redis_server.kill()  # back on the same port with its AOF below
        stopped.set()
        return {"type": "http.disconnect"}

    sent = _post_through_asgi(create_app(alloc, token=TOKEN),
                              {"request": {"profile": "4g.24gb", "ttl_s": 900}, "timeout_s": 0}, gone_as_redis_stops)
    assert stopped.is_set() and not any(m.get("status") == 201 for m in sent)
    fresh_redis_server.start()
    wait_until(lambda: alloc.status()["leases"] == [], 10, "the grant nobody read to be released")
