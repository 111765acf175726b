"""The HTTP lease API over a real allocator and Redis."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from prefect_mig.api import create_app
from prefect_mig.errors import ConfigError

from .allocator_fixtures import H100_MIXED

TOKEN = "a-test-token-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
    assert [row["lease_id"] for row in http.get("/v1/leases", headers=AUTH).json()] == [lease["lease_id"]]
    gone = http.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}, headers=AUTH)
    assert gone.json() == {"released": True}
    again = http.delete(f"/v1/leases/{lease['lease_id']}", params={"fence": lease["fence"]}, headers=AUTH)
    assert again.json() == {"released": False}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_token_is_refused_on_every_route(http, headers):
    calls = [
        http.post("/v1/leases", json={"request": {"profile": "1g.10gb"}}, headers=headers),
        http.post("/v1/leases/x/renew", json={"fence": 1}, headers=headers),
        http.delete("/v1/leases/x", params={"fence": 1}, headers=headers),
        http.get("/v1/leases", headers=headers),
        http.get("/v1/status", headers=headers),
    ]
    assert {c.status_code for c in calls} <= {401, 403}
    assert http.get("/v1/status", headers=AUTH).json()["leases"] == []


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


def test_bad_request_fields_are_422_with_the_field_named(http):
    bad = http.post("/v1/leases", json={"request": {"profile": "1g.10gb", "priority": 500}}, headers=AUTH)
    assert bad.status_code == 422 and "priority" in bad.text


def test_openapi_describes_the_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/leases", "/v1/leases/{lease_id}/renew", "/v1/leases/{lease_id}", "/v1/status"} <= set(paths)


def test_a_short_or_missing_token_refuses_to_build_the_app(alloc):
    with pytest.raises(ConfigError):
        create_app(alloc, token="short")
