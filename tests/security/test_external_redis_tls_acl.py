"""An external Redis over TLS with mutual certificates and the documented minimal ACL: the allocator
works through it, and a client without a certificate or with another user's rights gets nothing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.allocator.connection import MINIMAL_ACL, connect
from prefect_mig.errors import WaitTimeout
from prefect_mig.settings import Settings
from prefect_mig.testing.tls import make_certs


@pytest.fixture
def tls_redis(tmp_path, redis_server):  # redis_server: skips (or fails under CI) without redis-server
    certs = make_certs(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser pmig {MINIMAL_ACL} >app-password-123\n")
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs["server.pem"]), "--tls-key-file", str(certs["server.key"]),
         "--tls-ca-cert-file", str(certs["ca.pem"]), "--tls-auth-clients", "yes",
         "--aclfile", str(acl), "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline and proc.poll() is None, "TLS redis-server did not start"
        time.sleep(0.05)
    yield port, certs
    proc.terminate()
    proc.wait(30)


def test_the_allocator_works_over_mutual_tls_with_the_minimal_acl(tls_redis, namespace):
    port, certs = tls_redis
    settings = Settings(
        redis_url=f"rediss://pmig:app-password-123@127.0.0.1:{port}/0", namespace=namespace,
        redis_tls_ca_file=certs["ca.pem"], redis_tls_cert_file=certs["client.pem"], redis_tls_key_file=certs["client.key"],
    )
    client = connect(settings)
    alloc = Allocator(client, namespace)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    lease = alloc.acquire(SliceRequest(profile="4g.24gb"), timeout_s=0)
    assert alloc.renew(lease.lease_id, lease.fence, 30) > 0
    with pytest.raises(WaitTimeout):  # queue, blocking wait, keep-alive and withdrawal, all allowed
        alloc.acquire(SliceRequest(profile="4g.24gb"), timeout_s=0.5)
    assert alloc.release(lease.lease_id, lease.fence)
    assert alloc.status()["leases"] == []
    for refused in (lambda: client.flushall(), lambda: client.config_get("*"), lambda: client.set("other:key", "x")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()


def test_without_a_client_certificate_or_over_plain_tcp_nothing_answers(tls_redis):
    port, certs = tls_redis
    no_cert = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs["ca.pem"]),
                          username="pmig", password="app-password-123", socket_timeout=5)
    plain = redis.Redis(host="127.0.0.1", port=port, username="pmig", password="app-password-123", socket_timeout=5)
    for client in (no_cert, plain):
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
