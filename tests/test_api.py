"""The HTTP lease API over a real allocator and Redis."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from prefect_mig.api import create_app
from prefect_mig.errors import ConfigError

from .allocator_fixtures import H100_MIXED
from .api_fixtures import ADMIN_TOKEN

TOKEN = "a-test-token-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def http(alloc):
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    return TestClient(create_app(alloc, token=TOKEN))


def test_acquire_renew_release_round_trip(http):
    got = http.post("/v1/leases", json={"request": {"profile": "3g.40gb", "priority": 5}}, headers=AUTH)
    assert got.status_code == 201
    lease = got.json()
    assert lease["slice"]["profile"] == "3g.40gb" and lease["fence"] >= 1
    renewed = http.post(f"/v1/leases/{lease['lease_id']}/renew", json={"fence": lease["fence"], "ttl_s": 30}, headers=AUTH)
    assert renewed.status_code == 200 and renewed.json()["expires_at_ms"] > lease["expires_at_ms"] - 60_000
    [row] = http.get("/v1/leases", headers=AUTH).json()
    assert row["lease_id"] == lease["lease_id"]
    # numbers as in the acquire reply, not Redis' strings (a jq `.priority > 3` compared a string)
    assert (row["priority"], row["ttl_ms"], row["compute"]) == (5, 30_000, 3) and isinstance(row["expires_at"], int), row  # renewed for 30 s
    gone = http.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}, headers=AUTH)
    assert gone.json() == {"released": True}
    again = http.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}, headers=AUTH)
    assert again.json() == {"released": False}


def test_a_renew_without_ttl_s_keeps_the_lease_s_own_ttl(http):
    """Found by a new-user trial: a lease granted for 300 s and renewed with no ``ttl_s`` was cut to
    60 s, so a client renewing every 100 s (a third of its TTL) lost it."""
    lease = http.post("/v1/leases", json={"request": {"profile": "1g.10gb", "ttl_s": 300}}, headers=AUTH).json()
    path = f"/v1/leases/{lease['lease_id']}/renew"
    own = http.post(path, json={"fence": lease["fence"]}, headers=AUTH).json()["expires_at_ms"]
    assert own >= lease["expires_at_ms"] - 5_000, (own, lease)  # granted for 300 s, renewed for 300 s
    shorter = http.post(path, json={"fence": lease["fence"], "ttl_s": 30}, headers=AUTH).json()["expires_at_ms"]
    [row] = http.get("/v1/leases", headers=AUTH).json()
    assert row["ttl_ms"] == 30_000 and row["expires_at"] == shorter  # the list shows the TTL it now has
    again = http.post(path, json={"fence": lease["fence"]}, headers=AUTH).json()["expires_at_ms"]
    assert again - shorter < 10_000  # renewed by its own TTL, now 30 s
    http.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}, headers=AUTH)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_token_is_refused_on_every_route(http, headers):
    calls = [
        http.post("/v1/leases", json={"request": {"profile": "1g.10gb"}}, headers=headers),
        http.post("/v1/leases/x/renew", json={"fence": 1}, headers=headers),
        http.delete("/v1/leases/x", params={"fence": 1}, headers=headers),
        http.get("/v1/leases", headers=headers),
        http.get("/v1/leases/x", headers=headers),
        http.get("/v1/status", headers=headers),
    ]
    assert {c.status_code for c in calls} <= {401, 403}
    assert http.get("/v1/status", headers=AUTH).json()["leases"] == []


def test_an_unknown_token_is_a_401_refused_as_the_readme_says_not_a_403_which_means_a_tenant_or_ceiling(http):
    # A scraper or client with a wrong or revoked token must see "authenticate again" (401), not
    # the 403 a client token's tenant or priority ceiling gets.
    for path in ("/v1/status", "/metrics"):
        refused = http.get(path, headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert refused.status_code == 401, refused.text
        assert refused.json() == {"error": "Refused", "detail": "unknown or revoked bearer token"}
        assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_errors_map_to_http_statuses_with_the_message(http):
    held = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}, headers=AUTH).json()
    busy = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": 0}, headers=AUTH)
    assert busy.status_code == 409 and busy.json()["error"] == "NoCapacity"
    late = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": 0.2}, headers=AUTH)
    assert late.status_code == 408
    stale = http.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"] + 5}, headers=AUTH)
    assert stale.status_code == 409 and "stale" in stale.json()["detail"]
    lost = http.post("/v1/leases/nope/renew", json={"fence": 1}, headers=AUTH)
    assert lost.status_code == 410
    never = http.post("/v1/leases", json={"request": {"profile": "7g.80gb"}}, headers=AUTH)
    assert never.status_code == 409 and never.json()["error"] == "Unsatisfiable"


def test_every_refusal_has_one_body_shape_an_error_kind_and_a_detail(served_api):
    """A client parses one shape, whatever refused it. Found by a new-user trial: the body was
    ``{"detail": str}`` for a token's tenant or priority (403) and a missing fence (422),
    ``{"detail": [...]}`` for a malformed body, and ``{"error", "detail"}`` for the rest."""
    secret, _ = served_api.tokens.create(tenant="team-a", max_priority=5)
    admin, client = served_api.client(), served_api.client(secret)
    held = client.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}).json()
    refusals = {
        "no token": served_api.client(None).get("/v1/status"),
        "another tenant": client.post("/v1/leases", json={"request": {"profile": "1g.10gb", "tenant": "team-b"}}),
        "over the ceiling": client.post("/v1/leases", json={"request": {"profile": "1g.10gb", "priority": 9}}),
        "no capacity": admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": 0}),
        "malformed body": admin.post("/v1/leases", json={"request": {"profile": "1g.10gb", "priority": 500}}),
        "fence missing": client.delete(f"/v1/leases/{held['lease_id']}"),
        "no such route": admin.get("/v1/nothing-here"),
    }
    for what, reply in refusals.items():
        body = reply.json()
        assert reply.status_code >= 400 and set(body) == {"error", "detail"}, (what, reply.status_code, body)
        assert isinstance(body["error"], str) and body["detail"], (what, body)
    assert refusals["another tenant"].json()["error"] == "Forbidden"
    assert refusals["malformed body"].json()["error"] == "InvalidRequest"
    assert refusals["malformed body"].json()["detail"][0]["loc"][-1] == "priority"  # field errors, as FastAPI lists them
    assert refusals["fence missing"].json()["error"] == "InvalidRequest"
    assert refusals["no capacity"].json()["error"] == "NoCapacity"
    assert client.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"]}).json() == {"released": True}


def test_a_holder_reads_its_lease_and_learns_of_a_revocation_without_renewing(served_api):
    """An HTTP holder learned of an admin's revocation (or a preemption) only at its next renewal;
    ``GET /v1/leases/{id}`` answers its lease with ``revoked``, 410 once gone, and no fence."""
    secret, _ = served_api.tokens.create(tenant="team-a", max_priority=5)
    other, _ = served_api.tokens.create(tenant="team-b", max_priority=5)
    admin, client = served_api.client(), served_api.client(secret)
    held = client.post("/v1/leases", json={"request": {"profile": "3g.40gb", "ttl_s": 60}}).json()
    path = f"/v1/leases/{held['lease_id']}"
    before = client.get(path)
    assert before.status_code == 200, before.json()
    assert before.json()["revoked"] is False and before.json()["slice"] == held["slice"]
    assert "fence" not in before.json()
    assert served_api.client(other).get(path).status_code == 409  # another tenant's lease: not yours
    assert admin.delete(path).json()["revoked"] is True  # the admin revokes it, without its fence
    after = client.get(path)
    assert after.status_code == 200 and after.json()["revoked"] is True
    assert client.delete(path, params={"fence": held["fence"]}).json() == {"released": True}
    gone = client.get(path)
    assert gone.status_code == 410 and gone.json()["error"] == "LeaseLost"


def test_a_wait_that_times_out_says_why_it_waited_as_the_cli_does(http, alloc):
    # a new-user trial: the CLI's timeout says "It waited because: ...", the API's 408 did not
    alloc.drain_node("node-a")
    late = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": 0.3}, headers=AUTH)
    said = late.json()["detail"]
    assert late.status_code == 408 and "no slice within 0.3 s" in said, said
    assert "It waited because: node-a is drained for maintenance" in said, said
    assert "position" not in said  # the queue's length counts other tenants' requests
    assert alloc.status()["queue"] == []


def test_bad_request_fields_are_422_with_the_field_named(http):
    bad = http.post("/v1/leases", json={"request": {"profile": "1g.10gb", "priority": 500}}, headers=AUTH)
    assert bad.status_code == 422 and "priority" in bad.text


def test_a_misspelt_body_field_is_422_naming_it_and_holds_nothing(http):
    """Found by a new-user trial with curl: ``"timeout": 0`` (for ``timeout_s``) and ``"ttl": 30`` (for
    ``ttl_s``) were silently ignored, so the acquire waited the default 30 s and the renew set 60 s."""
    typo = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout": 0}, headers=AUTH)
    assert typo.status_code == 422 and "timeout" in typo.text and "timeout_s" in typo.text, typo.text
    nested = http.post("/v1/leases", json={"request": {"profile": "3g.40gb", "prio": 3}, "timeout_s": 0}, headers=AUTH)
    assert nested.status_code == 422 and "'prio'; allowed: profile" in nested.text and "priority" in nested.text, nested.text
    assert http.get("/v1/leases", headers=AUTH).json() == []
    lease = http.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}, headers=AUTH).json()
    renew = http.post(f"/v1/leases/{lease['lease_id']}/renew", json={"fence": lease["fence"], "ttl": 5}, headers=AUTH)
    assert renew.status_code == 422 and "ttl" in renew.text and "ttl_s" in renew.text, renew.text
    [row] = http.get("/v1/leases", headers=AUTH).json()
    assert int(row["ttl_ms"]) == lease["ttl_ms"]


def test_a_non_finite_number_is_422_naming_the_field_not_500(http):
    """Found by a bad-input review: the 422 for ``ttl_s: NaN`` could not be written as JSON (500)."""
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"request": {"profile": "1g.10gb", "ttl_s": %s}}' % value
        bad = http.post("/v1/leases", content=body, headers={**AUTH, "content-type": "application/json"})
        assert bad.status_code == 422, bad.text
        assert "ttl_s" in bad.text and value.lstrip("-") in bad.text


@pytest.mark.parametrize(
    "path, body, field, allowed",
    [
        ("/v1/leases", '{"request": {"profile": "1g.10gb"}, "timeout_s": %s}', "timeout_s", "allowed: 0 to 86400"),
        ("/v1/leases", '{"request": {"profile": "1g.10gb", "ttl_s": %s}}', "ttl_s", "allowed: 1 to 900"),
        ("/v1/leases", '{"request": {"min_memory_gb": %s}}', "min_memory_gb", "allowed: more than 0 to 1024"),
        ("/v1/leases/nope/renew", '{"fence": 1, "ttl_s": %s}', "ttl_s", "allowed: 1 to 900"),
    ],
    ids=["timeout_s", "ttl_s", "min_memory_gb", "renew-ttl_s"],
)
def test_a_non_finite_number_is_refused_as_not_finite_naming_the_field_the_value_and_the_range(http, path, body, field, allowed):
    """``"timeout_s": NaN`` was refused as "less than or equal to 86400", which NaN's every comparison
    fails, and ``-Infinity`` as "greater than or equal to 0": neither says what is wrong with it."""
    for value in ("NaN", "Infinity", "-Infinity"):
        bad = http.post(path, content=body % value, headers={**AUTH, "content-type": "application/json"})
        assert bad.status_code == 422, bad.text
        said = bad.json()
        assert said["error"] == "InvalidRequest", said
        (error,) = said["detail"]
        assert error["loc"][-1] == field and error["input"] == value, error
        assert error["msg"] == f"{field} must be a finite number, not {value}; {allowed}", error
    assert http.get("/v1/leases", headers=AUTH).json() == []


def test_a_ttl_past_a_day_is_422_naming_the_clusters_own_maximum(http):
    """Found by a new-user trial: ``ttl_s`` 100000 was refused as "less than or equal to 86400", then
    86400 as "1 to 900": the model's bound hid the cluster's (PREFECT_MIG_LEASE_MAX_TTL_S)."""
    for path, body in [("/v1/leases", {"request": {"profile": "1g.10gb", "ttl_s": 100_000}}),
                       ("/v1/leases/nope/renew", {"fence": 1, "ttl_s": 100_000})]:
        bad = http.post(path, json=body, headers=AUTH)
        assert bad.status_code == 422, bad.text
        (error,) = bad.json()["detail"]
        assert error["loc"][-1] == "ttl_s" and "900" in error["msg"] and "PREFECT_MIG_LEASE_MAX_TTL_S" in error["msg"]
        assert error["ctx"] == {"le": 900}  # not the model's day, which the message no longer says


def test_openapi_describes_the_routes_when_docs_are_on(alloc):
    http = TestClient(create_app(alloc, token=TOKEN, docs=True))
    assert http.get("/openapi.json").status_code == 401
    paths = http.get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/leases", "/v1/leases/{lease_id}/renew", "/v1/leases/{lease_id}", "/v1/status"} <= set(paths)


def test_a_short_or_missing_token_refuses_to_build_the_app(alloc):
    with pytest.raises(ConfigError):
        create_app(alloc, token="short")


def _wait_until(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def test_a_client_that_leaves_while_waiting_is_withdrawn_and_never_granted(served_api):
    admin = served_api.client()
    held = admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}).json()
    body = json.dumps({"request": {"profile": "3g.40gb"}, "timeout_s": None}).encode()
    with socket.create_connection(("127.0.0.1", served_api.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/leases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        _wait_until(lambda: len(served_api.alloc.status()["queue"]) == 1, "the acquire is queued")
    _wait_until(lambda: served_api.alloc.status()["queue"] == [], "the departed client's request is withdrawn")
    assert admin.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"]}).json() == {"released": True}
    assert served_api.alloc.status()["leases"] == []


def _post_through_asgi(app, body: dict, after_body) -> list[dict]:
    """POST /v1/leases with the admin token through the ASGI app itself, so the order of events is
    certain: `receive()` gives the body, then whatever `after_body()` (a coroutine function) returns.
    Returns the messages the app sent."""
    import asyncio

    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/leases", "raw_path": b"/v1/leases", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"x"), (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                    (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent: list[dict] = []
    messages = 0

    async def receive() -> dict:
        nonlocal messages
        messages += 1
        return {"type": "http.request", "body": raw, "more_body": False} if messages == 1 else await after_body()

    async def send(message: dict) -> None:
        sent.append(message)

    async def drive() -> None:
        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(drive())
    return sent


def _held_by_api(alloc) -> list[dict]:
    return [row for row in alloc.status()["leases"] if row["holder"].startswith("api:")]


def test_a_grant_that_races_the_clients_disconnect_is_released_not_left_held(redis_client, namespace):
    """The slice is handed to a waiting acquire in the very moment its client disconnects: the
    grant is made before the API sees the disconnect, so withdrawing the request finds it granted
    and must release it. The disconnect message is returned only after the hand-over. Hand-overs
    here stay unclaimed for 60 s, so a grant the API forgot would still be held when checked."""
    import asyncio

    from prefect_mig.allocator import Allocator, SliceRequest

    alloc = Allocator(redis_client, namespace, wait_ttl_s=30, claim_s=60)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))

    async def hand_over_then_leave() -> dict:
        while not alloc.status()["queue"]:  # the acquire is queued behind the held slice
            await asyncio.sleep(0.02)
        assert alloc.release(held.lease_id, held.fence)  # the slice is handed to the waiter now ...
        granted = [e for e in alloc.events() if e.get("type") == "lease.granted" and e.get("holder") != "someone else"]
        assert granted, "the release handed the slice to the waiting acquire"
        return {"type": "http.disconnect"}  # ... and its client is gone in the same instant

    sent = _post_through_asgi(create_app(alloc, token=ADMIN_TOKEN),
                              {"request": {"profile": "3g.40gb"}, "timeout_s": 30}, hand_over_then_leave)
    assert sent and sent[0]["status"] == 408  # the client (gone) would have been told it got nothing
    assert alloc.status()["leases"] == [], "the grant made as the client left is still held"
    assert alloc.status()["queue"] == []
    assert {s["state"] for s in alloc.status()["slices"] if s["profile"] == "3g.40gb"} == {"free"}


def test_a_client_gone_before_an_immediate_grant_is_answered_leaves_no_lease_held(redis_client, namespace):
    """The slice is free, so the acquire is granted at once, but its client disconnected right after
    sending it (or gave up while Redis was slow): the fence would go into a reply nobody reads, so
    the lease must be released, not held for its whole TTL (900 s) with the slice idle."""
    from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest

    alloc = Allocator(redis_client, namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    sent = _post_through_asgi(create_app(alloc, token=ADMIN_TOKEN),
                              {"request": {"profile": "3g.40gb", "ttl_s": 900}, "timeout_s": 30}, gone)
    granted = [e for e in alloc.events() if e.get("type") == "lease.granted"]
    assert len(granted) == 1, "the acquire was granted at once (what this test is about)"
    assert _held_by_api(alloc) == [], "the lease granted to the departed client is still held"
    assert not any(m.get("status") == 201 for m in sent), "a grant was answered to a client that had gone"
    again = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="next"), wait=False)
    assert isinstance(again, LeaseInfo), "the slice was not free again at once"


def test_a_client_gone_while_its_waited_grant_is_claimed_leaves_no_lease_held(redis_client, namespace):
    """The waited grant is claimed (renewed to its 900 s TTL) and only then does the API hear that
    the client left: the claimed lease must be released, not answered to nobody."""
    import asyncio

    from prefect_mig.allocator import Allocator, SliceRequest

    alloc = Allocator(redis_client, namespace, wait_ttl_s=30, claim_s=60)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]})
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))

    def claimed() -> bool:  # a hand-over lives 60 s here; a claimed lease its full 900 s
        return any(int(row["expires_at"]) - alloc.now_ms() > 300_000 for row in _held_by_api(alloc))

    handed_over = False

    async def leave_once_claimed() -> dict:  # checks synchronously: a reply sent after the claim sees it
        nonlocal handed_over
        while not claimed():
            if not handed_over and alloc.status()["queue"]:  # the acquire is queued: hand it the slice
                assert alloc.release(held.lease_id, held.fence)
                handed_over = True
            await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    sent = _post_through_asgi(create_app(alloc, token=ADMIN_TOKEN),
                              {"request": {"profile": "3g.40gb", "ttl_s": 900}, "timeout_s": 30}, leave_once_claimed)
    assert _held_by_api(alloc) == [], "the lease claimed for the departed client is still held"
    assert not any(m.get("status") == 201 for m in sent), "a grant was answered to a client that had gone"
    assert {s["state"] for s in alloc.status()["slices"] if s["profile"] == "3g.40gb"} == {"free"}


def test_a_waiting_acquire_is_handed_the_freed_slice_with_its_full_ttl(served_api):
    """A hand-over lives only a moment unclaimed (a departed waiter must not idle the slice); the
    API's async wait claims it, so the client gets its whole TTL, not a lease about to lapse."""
    admin = served_api.client()
    held = admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}).json()
    answer: dict = {}

    def wait_for_slice() -> None:
        with served_api.client(timeout=60) as c:
            answer["reply"] = c.post("/v1/leases", json={"request": {"profile": "3g.40gb", "ttl_s": 120}, "timeout_s": 30})

    waiter = threading.Thread(target=wait_for_slice, daemon=True)
    waiter.start()
    _wait_until(lambda: len(served_api.alloc.status()["queue"]) == 1, "the acquire is queued")
    admin.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"]})
    waiter.join(60)
    reply = answer["reply"]
    assert reply.status_code == 201, reply.text
    granted = reply.json()
    time.sleep(2.5)  # longer than a hand-over may stay unclaimed
    lease = served_api.alloc.lease(granted["lease_id"])
    assert lease.expires_at_ms - served_api.alloc.now_ms() > 100_000
    assert admin.delete(f"/v1/leases/{granted['lease_id']}", params={"fence": lease.fence}).json() == {"released": True}


def _wait_in_thread(served_api, answer: dict, timeout_s: float) -> threading.Thread:
    def wait_for_slice() -> None:
        with served_api.client(timeout=120) as c:
            answer["reply"] = c.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": timeout_s})
            answer["at"] = time.monotonic()

    waiter = threading.Thread(target=wait_for_slice, daemon=True)
    waiter.start()
    _wait_until(lambda: len(served_api.alloc.status()["queue"]) == 1, "the acquire is queued")
    return waiter


@pytest.mark.parametrize("api_allocator_options", [{"wait_ttl_s": 0.6}])
def test_a_waiting_acquire_is_kept_alive_past_many_silences(served_api, api_allocator_options):
    """The server keeps its waiting requests alive (a request untouched for 0.6 s is dropped)."""
    admin = served_api.client()
    held = admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}).json()
    answer: dict = {}
    waiter = _wait_in_thread(served_api, answer, 60)
    time.sleep(3.0)  # five silences long
    served_api.alloc.reap()
    assert len(served_api.alloc.status()["queue"]) == 1, "the waiting request was dropped as abandoned"
    admin.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"]})
    waiter.join(60)
    assert answer["reply"].status_code == 201, answer["reply"].text


@pytest.mark.parametrize("api_allocator_options", [{"wait_ttl_s": 1.5}])
def test_a_waiting_client_whose_request_was_dropped_is_told_soon(served_api, api_allocator_options):
    answer: dict = {}
    served_api.client().post("/v1/leases", json={"request": {"profile": "3g.40gb"}})
    waiter = _wait_in_thread(served_api, answer, 60)
    request_id = served_api.alloc.status()["queue"][0]["id"]
    dropped = time.monotonic()
    assert served_api.alloc.cancel(request_id) == "cancelled"  # as the reaper drops an abandoned one
    waiter.join(60)
    assert answer["reply"].status_code == 410, answer["reply"].text
    assert answer["at"] - dropped < 10, "the client waited on for a request that was gone"


@pytest.mark.parametrize("api_settings", [{"max_wait_s": 1.0}])
def test_a_wait_is_capped_by_the_servers_maximum(served_api, api_settings):
    admin = served_api.client()
    admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}})
    late = admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": None})
    assert late.status_code == 408
    assert served_api.alloc.status()["queue"] == []


def test_renew_does_not_queue_behind_waiting_acquires(served_api):
    admin = served_api.client()
    held = admin.post("/v1/leases", json={"request": {"profile": "3g.40gb"}}).json()
    waiters = 60  # more than the 40 threads a sync route may hold

    def wait_for_slice() -> None:
        with served_api.client(timeout=120) as c:
            c.post("/v1/leases", json={"request": {"profile": "3g.40gb"}, "timeout_s": 20})

    threads = [threading.Thread(target=wait_for_slice, daemon=True) for _ in range(waiters)]
    for t in threads:
        t.start()
    _wait_until(lambda: len(served_api.alloc.status()["queue"]) == waiters, "every acquire is queued", 90)
    with served_api.client(timeout=10) as quick:
        renewed = quick.post(f"/v1/leases/{held['lease_id']}/renew", json={"fence": held["fence"], "ttl_s": 60})
    assert renewed.status_code == 200
    admin.delete(f"/v1/leases/{held['lease_id']}", params={"fence": held["fence"]})
    for t in threads:
        t.join(120)


def test_api_serve_speaks_https_with_certfile_and_keyfile(redis_server, namespace, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_API_TOKEN": ADMIN_TOKEN}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect_mig.cli.main", "api", "serve", "--port", str(port),
         "--certfile", str(cert), "--keyfile", str(key)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as https:
            def answers() -> bool:
                try:
                    return https.get("/v1/leases", headers=AUTH_ADMIN).status_code == 200
                except httpx.TransportError:
                    return False

            _wait_until(answers, "the HTTPS API answers")
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/v1/leases", headers=AUTH_ADMIN, timeout=10)
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "70000"], "--port=70000: must be 1 to 65535"),
        (["--port", "0"], "--port=0: must be 1 to 65535"),
        (["--certfile", "{missing}", "--keyfile", "{key}"], "--certfile={missing!r}: cannot be read"),
        (["--certfile", "{key}", "--keyfile", "{missing}"], "--keyfile={missing!r}: cannot be read"),
        # these two ended in uvicorn's own "[Errno -2] Name or service not known" / "[Errno 98] ..."
        (["--host", "256.1.1.1", "--port", "{busy}"], "--host='256.1.1.1', --port={busy}: cannot listen on 256.1.1.1:{busy}"),
        (["--port", "{busy}"], "--host='127.0.0.1', --port={busy}: cannot listen on 127.0.0.1:{busy} (Address already in use)"),
    ],
)
def test_api_serve_refuses_a_bad_port_or_certificate_file_naming_the_option(redis_server, namespace, tmp_path, args, named):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))  # a port something else listens on
    paths = {"missing": str(tmp_path / "nonexist.pem"), "key": str(tmp_path / "key.pem"), "busy": taken.getsockname()[1]}
    (tmp_path / "key.pem").write_text("not checked before the missing one\n")
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_API_TOKEN": ADMIN_TOKEN}
    done = subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", "api", "serve", *[a.format(**paths) for a in args]],
        env=env, capture_output=True, text=True, timeout=120,
    )
    taken.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert named.format(**paths) in " ".join(done.stderr.split())


def test_an_api_started_before_an_agent_published_its_nvml_built_model_leases_on_that_model(redis_server, redis_client, namespace):
    """A node agent that comes up after `api serve` publishes a GPU model built from NVML: a request
    naming it is checked against the published model, not refused as unknown (422)."""
    from prefect_mig.allocator import Allocator
    from prefect_mig.model import get_model, register_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_API_TOKEN": ADMIN_TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "prefect_mig.cli.main", "api", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH_ADMIN, timeout=30) as api:
            def answers() -> bool:
                try:
                    return api.get("/v1/leases").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_until(answers, "the API answers")
            name = "Late-Published-Test-GPU"
            built = register_model(get_model("H100-80GB").model_copy(update={"name": name, "built_from_nvml": True}))
            cluster = Allocator(redis_client, namespace)
            cluster.publish_models([built])  # what the agent does before it publishes its inventory
            cluster.publish_fleet(f"node-z=1x{name}", layouts={"node-z": ["3g.40gb@0"]})
            got = api.post("/v1/leases", json={"request": {"profile": "3g.40gb", "gpu_model": name}, "timeout_s": 0})
            assert got.status_code == 201, got.text
            assert got.json()["slice"]["gpu_model"] == name
            unknown = api.post("/v1/leases", json={"request": {"profile": "3g.40gb", "gpu_model": "No-Such-GPU"}})
            assert unknown.status_code == 422 and "No-Such-GPU" in unknown.text
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("api_allocator_options", [{"wait_ttl_s": 1.5}])
def test_a_waiting_client_whose_queue_redis_lost_is_told_redis_lost_its_data(served_api, api_allocator_options, redis_client):
    """Redis lost its data (here only this cluster's keys, as a FLUSHALL would all of them) while an
    acquire waited: the client is told so and to ask again, not just that its request is gone."""
    answer: dict = {}
    served_api.client().post("/v1/leases", json={"request": {"profile": "3g.40gb"}})
    waiter = _wait_in_thread(served_api, answer, 60)
    time.sleep(1.5)
    redis_client.delete(*redis_client.keys(served_api.alloc.keys.prefix.replace("{", "[{]").replace("}", "[}]") + "*"))
    waiter.join(60)
    assert answer["reply"].status_code == 410, answer["reply"].text
    assert "Redis lost its data while it waited" in answer["reply"].json()["detail"]
