"""Remote Docker engines over TCP with TLS: the session's second engine also listens on
``tcp://127.0.0.1:<port>`` with ``--tlsverify`` and certificates made for the test run."""

from __future__ import annotations

import time

import pytest
import redis
from prefect import flow

from prefect_mig import MigTaskRunner, task
from prefect_mig.agent import NodeAgent
from prefect_mig.blocks import MigCluster
from prefect_mig.allocator import Allocator
from prefect_mig.errors import ConfigError, DockerUnavailable
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.launchers import ContainerSettings, DockerLauncher
from prefect_mig.launchers.engines import DockerTls, docker_tls_from
from prefect_mig.model import Layout
from prefect_mig.settings import Settings
from prefect_mig.testing.tls import make_certs


def client_tls(certs, *, ca=None) -> DockerTls:
    return DockerTls(ca_file=ca or certs["ca.pem"], cert_file=certs["client.pem"], key_file=certs["client.key"])


def double(x):
    return x * 2


def test_a_body_runs_on_an_engine_reached_over_tcp_with_client_certificates(second_engine, engine_certs, python_image):
    launcher = DockerLauncher(ContainerSettings(image=python_image, docker_host=second_engine.tcp_url,
                                                docker_tls=client_tls(engine_certs)))
    assert launcher.run(double, (21,), {}, mig_uuid="MIG-over-tls") == 42
    assert launcher.client.api.base_url == f"https://127.0.0.1:{second_engine.tcp_port}"


def test_the_tls_engine_refuses_a_client_without_certificates_or_with_another_cas(second_engine, engine_certs, tmp_path):
    with pytest.raises(DockerUnavailable) as bare:
        DockerLauncher(ContainerSettings(docker_host=second_engine.tcp_url)).client  # noqa: B018 - connects
    assert second_engine.tcp_url in str(bare.value) and "PREFECT_MIG_DOCKER_TLS_CA_FILE" in str(bare.value)
    assert "(not set)" in str(bare.value)
    stranger = make_certs(tmp_path, names=("client",))  # a client certificate another CA signed
    with pytest.raises(DockerUnavailable) as refused:
        DockerLauncher(ContainerSettings(docker_host=second_engine.tcp_url,
                                         docker_tls=client_tls(stranger, ca=engine_certs["ca.pem"]))).client  # noqa: B018
    assert "(given, but refused)" in str(refused.value)


def test_missing_or_partial_docker_tls_settings_name_what_is_missing(tmp_path, engine_certs):
    with pytest.raises(ConfigError) as partial:
        docker_tls_from(Settings(docker_tls_ca_file=engine_certs["ca.pem"]))
    assert "PREFECT_MIG_DOCKER_TLS_CERT_FILE" in str(partial.value) and "PREFECT_MIG_DOCKER_TLS_KEY_FILE" in str(partial.value)
    assert docker_tls_from(Settings()) is None
    gone = DockerTls(ca_file=engine_certs["ca.pem"], cert_file=tmp_path / "nope.pem", key_file=engine_certs["client.key"])
    with pytest.raises(ConfigError) as missing:
        DockerLauncher(ContainerSettings(docker_host="tcp://127.0.0.1:2376", docker_tls=gone)).client  # noqa: B018
    assert missing.value.field == "docker_tls.cert_file" and "nope.pem" in str(missing.value)


def report_slice():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_the_runner_reaches_a_nodes_published_tcp_engine_with_the_certificates_in_its_settings(
    second_engine, engine_certs, prefect_api, redis_server, namespace, monkeypatch, tmp_path
):
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    monkeypatch.setenv("PREFECT_MIG_BACKEND", "simulated")
    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    with GpuBackend(SimulatedNvml("node-t=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
        NodeAgent(backend, alloc, node="node-t", docker_url=second_engine.tcp_url, heartbeat_ttl_s=600).publish()

    def run_once(**runner):
        @flow
        def pipeline():
            try:
                return task(task_runner=MigTaskRunner(profile="4g.24gb", **runner))(report_slice)()
            except DockerUnavailable as exc:
                return exc
        return pipeline()

    refused = run_once()  # no client certificates in the settings: the engine says no
    assert isinstance(refused, DockerUnavailable) and "node-t" in str(refused) and second_engine.tcp_url in str(refused)

    for var, name in (("CA_FILE", "ca.pem"), ("CERT_FILE", "client.pem"), ("KEY_FILE", "client.key")):
        monkeypatch.setenv(f"PREFECT_MIG_DOCKER_TLS_{var}", str(engine_certs[name]))
    since = int(time.time()) - 1
    mig_uuid = run_once()
    assert mig_uuid == alloc.status()["slices"][0]["mig_uuid"]
    created = second_engine.client().events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create", "label": f"prefect-mig.namespace={namespace}"},
    )
    assert [e["Actor"]["Attributes"]["prefect-mig.node"] for e in created] == ["node-t"]

    for var in ("CA_FILE", "CERT_FILE", "KEY_FILE"):  # the same certificates as secrets of a MigCluster block
        monkeypatch.delenv(f"PREFECT_MIG_DOCKER_TLS_{var}")
    block = MigCluster(redis_url=redis_server.url, namespace=namespace, gpu_runtime="none",
                       **{f"docker_tls_{k}": engine_certs[f].read_text() for k, f in
                          (("ca", "ca.pem"), ("cert", "client.pem"), ("key", "client.key"))})
    assert run_once(cluster=block) == mig_uuid
    assert alloc.status()["leases"] == []


def test_the_orphan_sweep_sees_a_flow_runs_container_exited_on_a_tls_engine(second_engine, engine_certs, python_image,
                                                                            monkeypatch):
    """`MigDockerWorker.crash_orphaned_runs` marks Crashed a run whose worker died and whose container
    has exited, by looking the container up on its engine. On an engine reached over TCP with TLS
    it looked without the certificates in the settings, was refused, and so never marked such a run:
    it stayed Running for good, and Prefect's retries and automations never applied."""
    from prefect_mig.integrations.prefect.worker import _container_gone

    for var, name in (("CA_FILE", "ca.pem"), ("CERT_FILE", "client.pem"), ("KEY_FILE", "client.key")):
        monkeypatch.setenv(f"PREFECT_MIG_DOCKER_TLS_{var}", str(engine_certs[name]))
    engine = second_engine.client()
    container = engine.containers.run(python_image, ["python3", "-c", "raise SystemExit(3)"], detach=True,
                                      network_disabled=True)
    container.wait(timeout=60)
    assert _container_gone(f"{second_engine.tcp_url}:{container.id}") == "exited with code 3"
    assert container.id not in {c.id for c in engine.containers.list(all=True)}  # and it is removed
