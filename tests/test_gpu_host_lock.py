"""Two clusters on one host never serve one GPU: a standalone `prefect-mig agent` (or a local
cluster's) and `prefect-mig demo`, or two agents of different namespaces or Redis servers, would
each carve the host's GPUs, and a re-carve of one destroys an idle slice the other just leased.
The node claim fences only within one Redis; a lock per GPU on the host catches the rest. Real
processes, real Redis, the simulated NVML (its GPUs live in the state dir, so do their locks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from prefect_mig.allocator import Allocator
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout
from tests.agent_fixtures import run_in_thread

A30_TWO = "2g.12gb@0 + 2g.12gb@2"


def _env(redis_server, namespace: str, state_dir) -> dict:
    return {
        **os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(state_dir), "PREFECT_MIG_LAYOUT": "none", "COLUMNS": "200",
    }


def _cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def serving(redis_server, redis_client, namespace, tmp_path):
    """`prefect-mig agent` of `namespace` serving node-a's simulated A30 (carved A30_TWO), once it has
    published. Yields (its process, the GPU's UUID, the simulated backend)."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        gpu = backend.gpus()[0].uuid
        agent = subprocess.Popen([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--interval", "0.5"],
                                 env=_env(redis_server, namespace, tmp_path), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            alloc, deadline = Allocator(redis_client, namespace), time.monotonic() + 60
            while not alloc.redis.hexists(alloc.keys.nodes, "node-a"):
                assert agent.poll() is None, agent.stderr.read()
                assert time.monotonic() < deadline, "the agent never published its node"
                time.sleep(0.2)
            yield agent, gpu, backend
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            agent.wait(60)


def test_an_agent_of_another_cluster_for_a_gpu_an_agent_serves_refuses_naming_the_gpu_and_the_agent(
    serving, redis_server, redis_client, tmp_path
):
    agent, gpu, backend = serving
    other = "other" + str(os.getpid())
    refused = _cli("agent", "--once", env=_env(redis_server, other, tmp_path))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"GPU {gpu} is served by another process on this host: prefect-mig agent (pid {agent.pid}" in said, said
    assert f"kill {agent.pid}" in said and "prefect-mig down" in said and "Traceback" not in said
    other_alloc = Allocator(redis_client, other)
    assert not other_alloc.redis.hexists(other_alloc.keys.nodes, "node-a")  # published nothing
    assert str(backend.layout(0)) == A30_TWO and agent.poll() is None


def test_the_demo_refuses_to_carve_the_gpus_an_agent_serves(serving, redis_server, tmp_path):
    """The demo carves the simulated A30 empty (its layouts are for H100s): beside an agent it would
    destroy the slices that agent publishes, leased or about to be."""
    agent, gpu, backend = serving
    refused = _cli("demo", "--no-pipeline", env=_env(redis_server, "demo", tmp_path))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"GPU {gpu}" in said and f"prefect-mig agent (pid {agent.pid}" in said, said
    assert str(backend.layout(0)) == A30_TWO and agent.poll() is None


def test_a_gpu_whose_agent_was_killed_is_served_by_the_next_agent_at_once(serving, redis_server, tmp_path):
    """The lock dies with its process: a crash (SIGKILL) leaves nothing that holds the GPU."""
    agent, _, _ = serving
    agent.kill()
    agent.wait(30)
    started = _cli("agent", "--once", env=_env(redis_server, "other" + str(os.getpid()), tmp_path))
    assert started.returncode == 0, started.stdout + started.stderr


def test_a_library_users_agent_for_a_gpu_another_in_process_agent_serves_refuses_naming_it_and_carves_nothing(
    redis_client, namespace, tmp_path
):
    """`NodeAgent.run` called from one's own code (no CLI) locks the GPUs too: a second agent of another
    cluster (namespace) for the same simulated GPU refuses before it claims or carves anything."""
    from prefect_mig.agent import NodeAgent
    from prefect_mig.errors import GpuHeld

    other = "other" + str(os.getpid())
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as mine, \
            GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as theirs:
        mine.apply_layout(0, Layout.parse("A30-24GB", A30_TWO))
        gpu = mine.gpus()[0].uuid
        first = NodeAgent(mine, Allocator(redis_client, namespace), node="node-a", state_dir=tmp_path)
        second = NodeAgent(theirs, Allocator(redis_client, other), node="node-a")
        second.allocator.set_desired(gpu, "4g.24gb@0", kind="incremental")  # what the second cluster would carve
        stop = threading.Event()
        try:
            running, first_raised = run_in_thread(first, stop)
            deadline = time.monotonic() + 30
            while not first.allocator.redis.hexists(first.allocator.keys.nodes, "node-a"):
                assert time.monotonic() < deadline and not first_raised, first_raised
                time.sleep(0.1)
            refused, second_raised = run_in_thread(second, stop)
            refused.join(timeout=30)
            assert not refused.is_alive(), "a second agent for the GPU kept running beside the first"
            (error,) = second_raised
            assert isinstance(error, GpuHeld) and error.gpu == gpu and error.pid == os.getpid()
            assert error.what == "node agent" and error.about["namespace"] == namespace
            assert error.about["node"] == "node-a" and error.about["state_dir"] == str(tmp_path)
            said = str(error)
            assert f"GPU {gpu} is served by another process on this host: node agent (pid {os.getpid()}" in said
            assert f"namespace {namespace}" in said, said
            assert str(mine.layout(0)) == A30_TWO and second.allocator.desired(gpu) is not None
            assert not second.allocator.redis.hexists(second.allocator.keys.nodes, "node-a")  # published nothing
            assert running.is_alive() and first_raised == []
        finally:
            stop.set()
    running.join(timeout=30)
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as theirs, \
            NodeAgent(theirs, Allocator(redis_client, other), node="node-a").serving():
        pass  # the first gave the GPU back as it stopped


def test_real_gpus_lock_in_the_directory_the_settings_name_else_the_first_one_that_can_be_made(tmp_path):
    from prefect_mig.errors import GpuHeld
    from prefect_mig.gpu.host_lock import GpuLocks, lock_dirs

    real = GpuBackend()  # the real NVML's backend, never initialized: only its kind matters here
    assert lock_dirs(real, tmp_path / "mine") == [tmp_path / "mine"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    shared = tmp_path / "shared"
    run, tmp = tmp_path / "run" / "gpu-locks", tmp_path / "tmp" / "gpu-locks"
    assert lock_dirs(real, None, candidates=(run, tmp)) == [run, tmp]
    with GpuLocks([run, tmp], ["GPU-1"], what="prefect-mig agent"), pytest.raises(GpuHeld) as refused:
        with GpuLocks([tmp], ["GPU-1"], what="prefect-mig demo"):  # a user's, who cannot write /run: meets it in /tmp
            pass
    assert refused.value.pid == os.getpid() and refused.value.what == "prefect-mig agent"
    assert lock_dirs(real, None, candidates=(a_file / "gpu-locks", shared)) == [shared]
    assert shared.stat().st_mode & 0o7777 == 0o1777  # every user's agent can lock there; none removes another's file
    simulated = GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path / "state"))
    assert lock_dirs(simulated, tmp_path / "mine") == [tmp_path / "state" / "gpu-locks"]
