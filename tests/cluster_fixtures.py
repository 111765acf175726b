"""A two-node test cluster: two Docker engines, two node agents in their own processes, one Redis.

``second_engine`` (session) is a private ``dockerd`` with the test image loaded into it
(`prefect_mig.testing.docker_engine`). ``two_nodes`` simulates ``node-a`` on the machine's engine and
``node-b`` on the second one: each node gets its own ``prefect-mig agent`` subprocess
(``PREFECT_MIG_NODE`` and ``PREFECT_MIG_DOCKER_HOST`` per agent, a short heartbeat TTL) and its
simulated H100 is carved with ``prefect-mig layout apply -c all-1g.10gb --node NODE`` (7 slices
each). Teardown stops both agents and removes this cluster's task containers from both engines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from prefect_mig.allocator import Allocator
from prefect_mig.launchers.docker import task_containers
from prefect_mig.testing.docker_engine import DockerdUnavailable, PrivateDockerEngine, TlsFiles
from prefect_mig.testing.tls import make_certs

from .conftest import service_unavailable

FLEET = "node-a=1xH100-80GB,node-b=1xH100-80GB"
HEARTBEAT_TTL_S = 4.0
SLICES_PER_NODE = 7  # all-1g.10gb on an H100-80GB


def wait_until(predicate: Callable[[], object], *, timeout_s: float = 60.0, what: str) -> object:
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def engine_certs(tmp_path_factory) -> dict[str, Path]:
    """A CA with a server certificate for the second engine and a client certificate (PEM paths)."""
    return make_certs(tmp_path_factory.mktemp("engine-certs"))


@pytest.fixture(scope="session")
def second_engine(docker_client, python_image, engine_certs) -> Iterator[PrivateDockerEngine]:
    """A second Docker engine of the session's own, with the Python test image loaded. Besides its
    unix socket it listens on ``tcp://127.0.0.1:<port>`` with ``--tlsverify`` (`engine_certs`)."""
    server = TlsFiles(ca=engine_certs["ca.pem"], cert=engine_certs["server.pem"], key=engine_certs["server.key"])
    try:
        engine = PrivateDockerEngine(tls=server).start()
    except DockerdUnavailable as exc:
        service_unavailable(f"no second Docker engine: {exc}")
    try:
        engine.load_image(docker_client, python_image)
        yield engine
    finally:
        engine.stop()


class TwoNodes:
    """The running two-node cluster a test gets: its allocator, engines and agent processes."""

    def __init__(self, allocator: Allocator, env: dict[str, str], engines: dict[str, docker.DockerClient],
                 urls: dict[str, str], workdir: Path) -> None:
        self.allocator = allocator
        self.env = env
        self.engines = engines
        self.urls = urls
        self.workdir = workdir
        self.agents: dict[str, subprocess.Popen] = {}

    def node_env(self, node: str) -> dict[str, str]:
        return {
            **self.env,
            "PREFECT_MIG_NODE": node,
            "PREFECT_MIG_DOCKER_HOST": self.urls[node],
            "PREFECT_MIG_STATE_DIR": str(self.workdir / node),
            "PREFECT_MIG_LAYOUT": "none",  # carved by `layout apply`, as an operator does
        }

    def cli(self, *args: str, node: str = "node-a", timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", *args], capture_output=True,
                              text=True, env=self.node_env(node), timeout=timeout)

    def start_agent(self, node: str) -> subprocess.Popen:
        log = open(self.workdir / f"agent-{node}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.agents[node] = subprocess.Popen(
            [sys.executable, "-m", "prefect_mig.cli.main", "agent", "--interval", "0.5",
             "--heartbeat-ttl", str(HEARTBEAT_TTL_S)],
            env=self.node_env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self.agents[node]

    def kill_agent(self, node: str) -> None:
        proc = self.agents.pop(node)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def agent_log(self, node: str) -> str:
        path = self.workdir / f"agent-{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def slices(self, node: str, state: str | None = None) -> list[dict]:
        return [s for s in self.allocator.status()["slices"] if s["node"] == node and (state is None or s["state"] == state)]

    def alive(self, node: str) -> bool:
        return bool(self.allocator.status()["nodes"].get(node, {}).get("alive"))

    def containers(self, node: str, *, running_only: bool = False) -> list:
        """This cluster's task containers on `node`'s engine."""
        return task_containers(self.engines[node], cluster_id=self.allocator.cluster_id(),
                               namespace=self.allocator.keys.namespace, running_only=running_only)


@pytest.fixture
def two_nodes(redis_server, namespace, tmp_path, docker_client, second_engine) -> Iterator[TwoNodes]:
    """node-a (the machine's engine) and node-b (the second engine), each with its own agent process,
    carved to all-1g.10gb; stops the agents and removes this cluster's task containers afterwards."""
    env = {
        **os.environ,
        "PREFECT_MIG_REDIS_URL": redis_server.url,
        "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated",
        "PREFECT_MIG_SIMULATED_FLEET": FLEET,
        "COLUMNS": "200",
    }
    urls = {"node-a": os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock", "node-b": second_engine.url}
    engine_b = second_engine.client()
    cluster = TwoNodes(Allocator(redis_server.client(), namespace), env, {"node-a": docker_client, "node-b": engine_b},
                       urls, tmp_path)
    try:
        for node in ("node-a", "node-b"):
            (tmp_path / node).mkdir()
            cluster.start_agent(node)
        wait_until(lambda: {g["node"] for g in cluster.allocator.gpus()} == {"node-a", "node-b"},
                   what="both agents to publish their GPU")
        for node in ("node-a", "node-b"):
            carved = cluster.cli("layout", "apply", "-c", "all-1g.10gb", "--node", node)
            assert carved.returncode == 0, carved.stderr
        for node in ("node-a", "node-b"):
            wait_until(lambda n=node: len(cluster.slices(n, "free")) == SLICES_PER_NODE,
                       what=f"{node}'s agent to carve and publish 7 free 1g.10gb slices\n{cluster.agent_log(node)}")
        yield cluster
    finally:
        for node in list(cluster.agents):
            proc = cluster.agents.pop(node)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if not second_engine.answers():
            second_engine.restart()  # a test crashed it: bring it back for the session's next tests
        for node, client in cluster.engines.items():
            for container in cluster.containers(node):
                container.remove(force=True, v=True)
        engine_b.close()
