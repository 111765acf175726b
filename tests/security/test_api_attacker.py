"""The lease API as an attacker sees it: another tenant's token, a stolen lease id, a huge body."""

from __future__ import annotations

import socket

import pytest

from tests.api_fixtures import ADMIN_TOKEN

ACQUIRE = {"request": {"profile": "3g.40gb"}, "timeout_s": 0}


@pytest.fixture
def teams(served_api):
    """Tokens of team-a (ceiling 50) and team-b (ceiling 100), and team-a's lease."""
    a_token, _ = served_api.tokens.create(tenant="team-a", max_priority=50)
    b_token, _ = served_api.tokens.create(tenant="team-b", max_priority=100)
    a, b = served_api.client(a_token), served_api.client(b_token)
    got = a.post("/v1/leases", json=ACQUIRE)
    assert got.status_code == 201, got.text
    return a, b, got.json()


def test_another_tenants_token_cannot_renew_release_or_read_the_fence(served_api, teams):
    a, b, lease = teams
    lid, fence = lease["lease_id"], lease["fence"]
    renew = b.post(f"/v1/leases/{lid}/renew", json={"fence": fence})
    release = b.delete(f"/v1/leases/{lid}", params={"fence": fence})
    assert (renew.status_code, release.status_code) == (409, 409)
    assert "stale or not yours" in renew.json()["detail"] and "stale or not yours" in release.json()["detail"]
    assert lid not in b.get("/v1/leases").text
    for who in (a, b, served_api.client()):
        for row in who.get("/v1/leases").json() + who.get("/v1/status").json()["leases"]:
            assert "fence" not in row
    assert served_api.alloc.lease(lid).fence == fence  # still team-a's, untouched


def test_status_shows_another_tenant_neither_its_lease_ids_nor_its_waiting_requests(served_api, teams):
    """Found by a new-user trial: /v1/leases hid team-a's lease from team-b, but /v1/status named it
    on its slice and listed team-a's queued requests with their holders."""
    from prefect_mig.allocator import SliceRequest

    a, b, lease = teams
    queued = served_api.alloc.try_acquire(
        SliceRequest(profile="3g.40gb", tenant="team-a", holder="flow-run/team-a-secret"), wait=True, wait_s=60)
    try:
        seen_by_b = b.get("/v1/status")
        assert seen_by_b.status_code == 200
        assert lease["lease_id"] not in seen_by_b.text and "team-a-secret" not in seen_by_b.text, seen_by_b.text
        assert "leased" in {row["state"] for row in seen_by_b.json()["slices"]}  # the slice is busy all the same
        seen_by_a = a.get("/v1/status").json()
        assert lease["lease_id"] in {row["lease"] for row in seen_by_a["slices"]}
        assert [row["holder"] for row in seen_by_a["queue"]] == ["flow-run/team-a-secret"]
    finally:
        served_api.alloc.cancel(queued.request_id)


def test_a_wrong_fence_is_told_stale_without_the_current_fence(served_api, teams):
    a, _, lease = teams
    wrong = lease["fence"] + 1_000_003
    for reply in (
        a.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": wrong}),
        served_api.client().delete(f"/v1/leases/{lease['lease_id']}", params={"fence": wrong}),
    ):
        assert reply.status_code == 409
        assert str(lease["fence"]) not in reply.text
    assert a.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}).json() == {"released": True}


def test_a_token_leases_only_as_its_tenant_up_to_its_ceiling(served_api, teams):
    a, _, lease = teams
    assert served_api.alloc.lease(lease["lease_id"]).tenant == "team-a"
    over = a.post("/v1/leases", json={"request": {"profile": "1g.10gb", "priority": 51}, "timeout_s": 0})
    assert over.status_code == 403 and "priority" in over.json()["detail"] and "50" in over.json()["detail"]
    other = a.post("/v1/leases", json={"request": {"profile": "1g.10gb", "tenant": "team-b"}, "timeout_s": 0})
    assert other.status_code == 403 and "tenant" in other.json()["detail"]
    assert [row["lease_id"] for row in served_api.alloc.status()["leases"]] == [lease["lease_id"]]


def test_a_revoked_or_forged_token_is_refused(served_api):
    token, grant = served_api.tokens.create(tenant="team-a", max_priority=10)
    assert served_api.client(token).get("/v1/leases").status_code == 200
    forged = token.rsplit(".", 1)[0] + ".not-the-secret"
    assert served_api.client(forged).get("/v1/leases").status_code == 401  # authenticate again, not Forbidden
    assert served_api.tokens.revoke(grant.token_id)
    assert served_api.client(token).get("/v1/leases").status_code == 401


def test_an_admin_may_revoke_any_lease_without_its_fence_and_the_slice_waits_for_its_holder(served_api, teams):
    """An admin's fence-less DELETE released the lease at once, so the slice could go to the next
    waiter while its holder still used it (a fault campaign). It now revokes, as a preemption does:
    the holder is told and stops, and the slice goes on when the holder releases it."""
    from prefect_mig.allocator import SliceRequest

    a, b, lease = teams
    lid, fence = lease["lease_id"], lease["fence"]
    assert b.delete(f"/v1/leases/{lid}").status_code == 409
    assert a.delete(f"/v1/leases/{lid}").status_code == 422  # its owner still needs the fence
    revoked = served_api.client().delete(f"/v1/leases/{lid}").json()
    assert revoked["revoked"] is True and revoked["released"] is False
    waiting = served_api.alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="next"), wait=True)
    assert waiting.request_id  # queued: the holder may still be using the slice
    assert [row["lease_id"] for row in served_api.alloc.status()["leases"]] == [lid]
    told = a.post(f"/v1/leases/{lid}/renew", json={"fence": fence})
    assert told.status_code == 410 and "revoked by an admin" in told.text
    assert a.delete(f"/v1/leases/{lid}", params={"fence": fence}).json() == {"released": True}
    assert [row["holder"] for row in served_api.alloc.status()["leases"]] == ["next"]


def test_a_clients_delete_without_a_fence_is_422_whether_or_not_the_lease_still_exists(served_api, teams):
    """Found by a new-user trial: on a lease that had ended (or never existed) it answered 200
    {"released": false}, so a client script that forgot the fence learnt nothing of its mistake."""
    a, _, lease = teams
    assert a.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}).json() == {"released": True}
    for lid in (lease["lease_id"], "no-such-lease"):
        reply = a.delete(f"/v1/leases/{lid}")
        assert reply.status_code == 422 and "fence: required" in reply.json()["detail"], reply.text
    assert served_api.client().delete("/v1/leases/no-such-lease").json() == {"released": False}  # an admin's revoke


def _raw(port: int, head: str) -> str:
    """Send only `head` (request line + headers), read whatever the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        return sock.recv(65536).decode("latin-1")


def test_an_unauthenticated_huge_body_is_refused_before_it_is_sent(served_api):
    head = "POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000000\r\n\r\n"
    assert _raw(served_api.port, head).startswith("HTTP/1.1 401")  # answered without one body byte


def test_an_authenticated_body_over_the_limit_is_413(served_api):
    head = (
        f"POST /v1/leases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n"
    )
    assert _raw(served_api.port, head).startswith("HTTP/1.1 413")
    chunked = served_api.client().post(
        "/v1/leases", content=(b"x" * 16384 for _ in range(8)), headers={"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413


def test_docs_and_schema_are_not_served_to_anyone_by_default(served_api):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert served_api.client(None).get(path).status_code == 401
        assert served_api.client().get(path).status_code == 404


def test_a_redis_outage_does_not_show_the_store_address(fresh_redis_server, namespace):
    from fastapi.testclient import TestClient

    from prefect_mig.allocator import Allocator
    from prefect_mig.api import create_app

    alloc = Allocator(fresh_redis_server.client(), namespace)
    http = TestClient(create_app(alloc, token=ADMIN_TOKEN))
    port = fresh_redis_server.port
    fresh_redis_server.stop()
    down = http.get("/v1/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert down.status_code == 503
    assert str(port) not in down.text and "127.0.0.1" not in down.text
