"""A replicated Redis whose every process (primary, replica, three Sentinels: real processes) speaks
TLS only, asks for a client certificate, and has a password, the Sentinels their own. Reached with
``rediss+sentinel://`` and the same TLS settings as ``rediss://``: grants go through and wait for the
replica; without the Sentinels' password, without a client certificate, or in clear, nothing
answers. URLs that do not parse are refused naming the field and what is allowed."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from prefect_mig.allocator import LeaseClient, SliceRequest
from prefect_mig.allocator.connection import client_for_url, connect, url_options
from prefect_mig.errors import ConfigError, RedisUnavailable
from prefect_mig.settings import Settings
from prefect_mig.testing.sentinel import ReplicatedRedis
from prefect_mig.testing.tls import make_certs

DATA_PASSWORD = "data-pw-123"
SENTINEL_PASSWORD = "sentinel-pw-456"


@pytest.fixture(scope="module")
def secured(tmp_path_factory, redis_server):  # redis_server: skips (or fails under CI) without redis-server
    certs = make_certs(tmp_path_factory.mktemp("sentinel-certs"))
    with ReplicatedRedis(
        service="pmig-secure", tls=certs, password=DATA_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as cluster:
        yield cluster, certs


def _settings(url: str, certs, namespace: str, **more) -> Settings:
    return Settings(
        redis_url=url, namespace=namespace, redis_replicas=1,
        redis_tls_ca_file=certs["ca.pem"], redis_tls_cert_file=certs["client.pem"], redis_tls_key_file=certs["client.key"],
        **more,
    )  # fmt: skip


def _lease_cycle(client: LeaseClient) -> None:
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]}, heartbeat_ttl_s=600)
    lease = client.acquire(SliceRequest(profile="4g.24gb", ttl_s=30), timeout_s=10)
    lease.renew()  # raises unless a replica acknowledged it
    assert lease.renewals >= 1 and lease.release()
    assert client.allocator.status()["leases"] == []


def test_leases_go_through_tls_sentinels_with_a_password_to_a_tls_primary_and_wait_for_its_replica(secured, namespace):
    cluster, certs = secured
    assert cluster.url.startswith("rediss+sentinel://") and "sentinel_password=" in cluster.url
    # the Sentinels reached each other (their password) and the data nodes (TLS, auth-pass)
    peers = cluster.sentinel(0).sentinel_sentinels(cluster.service)
    assert len(peers) == 2 and not any("disconnected" in str(p.get("flags")) for p in peers)
    # the Sentinels' password in the URL, as LeaseClient.from_settings and every command read it
    settings = _settings(cluster.url, certs, namespace)
    _lease_cycle(LeaseClient.from_settings(settings))
    # ... or in its own setting, the URL carrying none
    bare = cluster.url.partition("?")[0]
    settings = _settings(bare, certs, namespace, redis_sentinel_password=SENTINEL_PASSWORD)
    client = connect(settings)
    assert client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    _lease_cycle(LeaseClient(client, namespace, replicas=1))  # WAIT 1: the replica follows over TLS


def test_the_apis_waiting_acquire_reaches_the_tls_primary_through_the_tls_sentinels(secured, namespace):
    from fastapi.testclient import TestClient

    from prefect_mig.api import create_app

    cluster, certs = secured
    client = LeaseClient.from_settings(_settings(cluster.url, certs, namespace))
    client.allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]}, heartbeat_ttl_s=600)
    held = client.allocator.acquire(SliceRequest(profile="4g.24gb"), timeout_s=0)
    token = "an-admin-token-of-some-length"
    with TestClient(create_app(client.allocator, token=token)) as http:
        auth = {"Authorization": f"Bearer {token}"}
        waited = http.post("/v1/leases", json={"request": {"profile": "4g.24gb"}, "timeout_s": 1}, headers=auth)
        assert waited.status_code == 408, waited.text  # it waited on the primary (async, over TLS), then gave up
        assert client.allocator.release(held.lease_id, held.fence)
        got = http.post("/v1/leases", json={"request": {"profile": "4g.24gb"}, "timeout_s": 5}, headers=auth)
        assert got.status_code == 201, got.text
        assert http.delete(f"/v1/leases/{got.json()['lease_id']}", params={"fence": got.json()["fence"]}, headers=auth).json() == {"released": True}


def test_without_the_sentinels_password_a_client_certificate_or_tls_nothing_is_reached(secured, namespace):
    cluster, certs = secured
    bare = cluster.url.partition("?")[0]
    with pytest.raises(redis.ConnectionError):  # MasterNotFoundError: no Sentinel would answer
        connect(_settings(bare, certs, namespace)).ping()
    # each Sentinel refuses the unauthenticated, the certificate-less and the clear
    once = {"retry": Retry(NoBackoff(), 0)}
    with pytest.raises(redis.AuthenticationError):
        cluster.sentinel(0, password=None, **once).ping()
    with pytest.raises(redis.ConnectionError):
        cluster.sentinel(0, ssl_certfile=None, ssl_keyfile=None, **once).ping()
    with pytest.raises(redis.ConnectionError):
        cluster.sentinel(0, ssl=False, **once).ping()
    # and so does the primary they name
    with pytest.raises(redis.ConnectionError):
        cluster.primary.client(ssl=False, socket_timeout=5, **once).ping()


def test_sentinels_that_name_no_primary_are_one_line_that_says_which_service_and_sentinels(secured, namespace):
    """Without the Sentinels' password, or with a service name they do not know, a command fails
    with a line that names the service, each Sentinel asked and what to check, not redis-py's
    repr of every Sentinel client's connection settings."""
    cluster, certs = secured
    bare = cluster.url.partition("?")[0]
    with pytest.raises(RedisUnavailable) as refused:
        LeaseClient(connect(_settings(bare, certs, namespace)), namespace).allocator.status()
    said = str(refused.value)
    assert f"no Sentinel named a primary for service '{cluster.service}'; asked " in said
    assert all(f":{port}" in said for port in cluster.sentinel_ports), said
    assert "sentinel_password" in said and "ConnectionPool(" not in said and len(said) < 800
    assert "read the status" in said  # what was being done
    unknown = cluster.url.replace(f"/{cluster.service}/0", "/no-such-service/0")
    with pytest.raises(RedisUnavailable) as refused:
        LeaseClient(connect(_settings(unknown, certs, namespace)), namespace).allocator.status()
    assert "for service 'no-such-service' (the Sentinels that answered know no such service" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("rediss+sentinel://h:1/pmig?sentinel_pass=x", "unknown query parameter 'sentinel_pass' (allowed: sentinel_username, sentinel_password)"),
        ("rediss+sentinel://h:1,h2/pmig", "sentinel address 'h2' needs a port"),
        ("rediss+sentinel://h:99999/pmig", "sentinel address 'h:99999' needs a port (1-65535)"),
        ("redis+sentinel://h:1/pmig/zero", "the database 'zero' must be a number"),
        ("rediss+sentinel://h:1", "the path must be /service-name"),
    ],
)
def test_a_secure_sentinel_url_that_does_not_parse_is_refused_naming_what_is_wrong(url, says):
    with pytest.raises(ConfigError) as refused:
        client_for_url(url)
    assert refused.value.field == "redis_url" and says in str(refused.value)
    assert "redis[s]+sentinel://" in str(refused.value)  # and the form that is allowed


def test_tls_files_with_a_plain_sentinel_url_are_refused_rather_than_ignored(tmp_path):
    settings = Settings(redis_url="redis+sentinel://pmig:pw@10.0.0.1:26379/pmig", redis_tls_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="rediss\\+sentinel://") as refused:
        connect(settings)
    assert refused.value.field == "redis_url" and "pw" not in str(refused.value)
    assert url_options(settings.model_copy(update={"redis_tls_ca_file": None})) == {}


def test_the_sentinels_password_never_shows_in_a_refusal():
    with pytest.raises(ConfigError) as refused:
        client_for_url("rediss+sentinel://u:data-secret@h:1/pmig?sentinel_password=sentinel-secret&x=1")
    assert "data-secret" not in str(refused.value) and "sentinel-secret" not in str(refused.value)
