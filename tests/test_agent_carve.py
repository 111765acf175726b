"""The node agent's carve of empty GPUs to the default layout config, when it is cut short: a kill
between two creates, a SIGTERM from `prefect-mig down` or the supervisor."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout
from prefect_mig.model.layout_configs import LayoutConfigs

BALANCED = "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3"  # the default config on an A30


class _Killed(BaseException):
    """The agent process dying (SIGKILL) between two GPU instance creates: nothing after it runs."""


@pytest.fixture
def empty_a30(tmp_path):
    """node-a's GPU backend: one simulated A30 with MIG on and no instances."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path / "gpus")) as backend:
        yield backend


def _killed_mid_carve(backend, alloc, state_dir) -> None:
    """An agent carving the empty GPU to the default config dies after its first instance."""
    nvml, created = backend.nvml, []

    def create(device, profile_id, placement):
        if created:
            raise _Killed
        created.append(placement)
        return type(nvml).nvmlDeviceCreateGpuInstanceWithPlacement(nvml, device, profile_id, placement)

    nvml.nvmlDeviceCreateGpuInstanceWithPlacement = create
    try:
        with pytest.raises(_Killed):
            NodeAgent(backend, alloc, node="node-a", state_dir=state_dir).carve_empty(LayoutConfigs.load(), "balanced")
    finally:
        del nvml.nvmlDeviceCreateGpuInstanceWithPlacement
    assert str(backend.layout(0)) == "2g.12gb@0"  # half carved


@pytest.mark.parametrize("with_state_dir", [True, False], ids=["recorded", "no-state-dir"])
def test_a_carve_of_an_empty_gpu_cut_short_is_finished_when_the_agent_starts_again(empty_a30, alloc, tmp_path, with_state_dir):
    state_dir = tmp_path / "state" if with_state_dir else None
    _killed_mid_carve(empty_a30, alloc, state_dir)
    kept = empty_a30.instances(0)[0]
    restarted = NodeAgent(empty_a30, alloc, node="node-a", state_dir=state_dir)
    assert restarted.carve_empty(LayoutConfigs.load(), "balanced") == [f"GPU 0 (A30-24GB): {BALANCED} (finished a carve cut short)"]
    assert str(empty_a30.layout(0)) == BALANCED
    assert kept in empty_a30.instances(0)  # the instance in place was kept, not re-made
    assert restarted.publish()[0] == 3
    again = NodeAgent(empty_a30, alloc, node="node-a", state_dir=state_dir)
    assert again.carve_empty(LayoutConfigs.load(), "balanced") == []  # done: nothing more to do
    if with_state_dir:
        (record,) = (tmp_path / "state" / "agent" / "carving").iterdir()
        assert oct(record.stat().st_mode & 0o777) == "0o600" and record.read_text() == "{}"


@pytest.mark.parametrize("use", ["process", "lease"])
def test_a_half_carved_gpu_whose_instance_is_in_use_is_left_as_it_is(empty_a30, alloc, tmp_path, use):
    """Completing it would only create what is missing, but the GPU is in use as it is: the agent
    leaves it (never destroys or re-carves a busy slice) and finishes it once it is idle."""
    _killed_mid_carve(empty_a30, alloc, tmp_path / "state")
    (busy,) = empty_a30.instances(0)
    agent = NodeAgent(empty_a30, alloc, node="node-a", state_dir=tmp_path / "state")
    if use == "process":
        empty_a30.nvml.attach_process(busy.mig_uuid, pid=4242)
    else:
        agent.publish()
        lease = alloc.try_acquire(SliceRequest(profile="2g.12gb", ttl_s=600))
        assert lease.slice.mig_uuid == busy.mig_uuid
    assert agent.carve_empty(LayoutConfigs.load(), "balanced") == []
    assert empty_a30.instances(0) == [busy]  # same MIG UUID: neither destroyed nor re-made
    if use == "process":
        empty_a30.nvml.detach_process(busy.mig_uuid, pid=4242)
    else:
        alloc.release(lease.lease_id, lease.fence)
    restarted = NodeAgent(empty_a30, alloc, node="node-a", state_dir=tmp_path / "state")
    assert len(restarted.carve_empty(LayoutConfigs.load(), "balanced")) == 1
    assert str(empty_a30.layout(0)) == BALANCED and busy in empty_a30.instances(0)


def test_a_gpu_carved_in_part_on_purpose_is_left_as_it_is(empty_a30, alloc, tmp_path):
    """With a state dir, only a carve the agent recorded is finished: a layout someone chose (the
    repartitioner's, `layout apply`) that leaves part of the GPU uncarved stays so."""
    empty_a30.apply_layout(0, Layout.parse("A30-24GB", "2g.12gb@0"))
    agent = NodeAgent(empty_a30, alloc, node="node-a", state_dir=tmp_path / "state")
    assert agent.carve_empty(LayoutConfigs.load(), "balanced") == []
    assert str(empty_a30.layout(0)) == "2g.12gb@0"


_SLOW_CARVE = """
import os, sys, time
from prefect_mig.gpu.simulated_nvml import SimulatedNvml

real, reached, go = SimulatedNvml.nvmlDeviceCreateGpuInstanceWithPlacement, sys.argv[1], sys.argv[2]

def create(self, *args):  # the second create waits: the test sends SIGTERM then
    if os.path.exists(reached):
        while not os.path.exists(go):
            time.sleep(0.05)
    else:
        open(reached, "w").close()
    return real(self, *args)

SimulatedNvml.nvmlDeviceCreateGpuInstanceWithPlacement = create
from prefect_mig.cli.main import app
sys.argv = ["prefect-mig", "agent", "--node", "node-a", "--interval", "0.5"]
app()
"""


def _reading(agent: subprocess.Popen, marker: str) -> tuple[list[str], threading.Event, threading.Thread]:
    """Collect the agent's output lines from a thread; the event is set once a line holds `marker`."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in agent.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, seen, reader


def test_sigterm_during_the_carve_lets_it_finish_before_the_agent_exits(redis_server, namespace, tmp_path):
    env = {
        **os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(tmp_path),
    }
    reached, go = tmp_path / "reached", tmp_path / "go"
    agent = subprocess.Popen([sys.executable, "-c", _SLOW_CARVE, str(reached), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent never began carving"
            time.sleep(0.05)
        lines, told, reader = _reading(agent, "stops once the layout change under way is done")
        agent.send_signal(signal.SIGTERM)  # mid carve: its second create waits for `go`
        # the carve goes on once the agent has handled the signal (it says so), not after a fixed 1 s,
        # which on a loaded machine could pass before the handler ran and check nothing
        deadline = time.monotonic() + 60
        while not told.wait(0.1) and agent.poll() is None and time.monotonic() < deadline:
            pass
        go.touch()
        agent.wait(60)
        reader.join(10)
        output = "".join(lines)
    finally:
        agent.kill()
    assert agent.returncode == 0, output
    assert "stops once the layout change under way is done" in output
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        assert str(backend.layout(0)) == BALANCED


def _slow_carving_agent(server, namespace, tmp_path, *options):
    """A CLI agent (`options`) on node-a of `server` whose carve's second create waits for the file
    `go`; `reached` exists once it began carving. Returns (process, reached, go)."""
    env = {
        **os.environ, "PREFECT_MIG_REDIS_URL": server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(tmp_path), "COLUMNS": "200",
    }
    reached, go = tmp_path / "reached", tmp_path / "go"
    script = _SLOW_CARVE.replace('"--interval", "0.5"', ", ".join(f'"{o}"' for o in options))
    agent = subprocess.Popen([sys.executable, "-c", script, str(reached), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return agent, reached, go


def _wait_until_carved_and_published(agent, alloc, lines: list[str], tmp_path) -> None:
    """Within 60 s, node-a's A30 is carved to the default config and its 3 slices are published."""
    deadline = time.monotonic() + 60
    while alloc.redis.scard(alloc.keys.node_slices("node-a")) < 3:
        assert agent.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "the agent never finished its carve and published"
        time.sleep(0.1)
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        assert str(backend.layout(0)) == BALANCED


@pytest.mark.parametrize("meanwhile", ["nobody took the node", "another agent took it"])
def test_an_agent_whose_claim_lapses_during_its_first_carve_claims_the_node_again_or_exits_naming_who_has_it(
    fresh_redis_server, namespace, tmp_path, meanwhile
):
    """Redis stops answering for longer than the claim's TTL while the agent carves its empty GPU:
    the agent carves no further until it has claimed the node again. Once Redis is back it claims
    it, finishes the carve and serves, saying so; it exits (1, naming the agent) only if another
    agent holds the node by then. A supervisor's restart is no answer: users read exit 1 as a crash."""
    from prefect_mig.allocator import Allocator
    from prefect_mig.node_claim import NodeClaim

    server = fresh_redis_server
    agent, reached, go = _slow_carving_agent(server, namespace, tmp_path, "--interval", "0.5", "--heartbeat-ttl", "2")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True)
    reader.start()
    alloc = Allocator(server.client(), namespace)
    try:
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent never began carving"
            time.sleep(0.05)
        server.kill()  # its second create waits for `go`; the claim lapses meanwhile
        time.sleep(2 + 1)
        server.restart()
        if meanwhile == "another agent took it":
            other = NodeClaim(alloc, "node-a", ttl_s=60, gpus=lambda: [])
            other.identity["host"] = "another-gpu-host"
            other.take()
        go.touch()
        if meanwhile == "another agent took it":
            agent.wait(60)
            reader.join(10)
            output = "".join(lines)
            assert agent.returncode == 1, output
            assert "already has a live agent" in output and "another-gpu-host" in output
            with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
                assert len(backend.instances(0)) == 2, "it carved on after another agent took its node"
            return
        _wait_until_carved_and_published(agent, alloc, lines, tmp_path)
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        reader.join(10)
        output = "".join(lines)
        assert agent.returncode == 0, output
        assert "claimed the node again" in output
    finally:
        agent.kill()


def test_a_stop_signal_while_the_first_round_waits_for_redis_stops_the_agent_at_once(fresh_redis_server, namespace, tmp_path):
    """Redis stops answering mid-carve and stays down: the agent's first round waits for it (60 s at
    --interval 120). SIGTERM then ends the agent within seconds with exit 0, as during `run`'s
    backoff, not after the pause: `prefect-mig down` and systemd would otherwise wait or kill it."""
    server = fresh_redis_server
    agent, reached, go = _slow_carving_agent(server, namespace, tmp_path, "--interval", "120", "--heartbeat-ttl", "2")
    lines, waiting, reader = _reading(agent, "retrying in 60.0 s")
    try:
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent never began carving"
            time.sleep(0.05)
        server.kill()  # and it stays down: the claim lapses while the second create waits for `go`
        time.sleep(2 + 1)
        go.touch()
        assert waiting.wait(50), "".join(lines)
        agent.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        agent.wait(55)
        stopped_after = time.monotonic() - sent
        reader.join(10)
    finally:
        agent.kill()
    output = "".join(lines)
    assert agent.returncode == 0, output
    assert stopped_after < 30, f"stopped {stopped_after:.1f} s after SIGTERM, not at once\n{output}"
    assert "agent stopped (signal 15)" in output


@pytest.mark.parametrize("then", ["Redis comes up", "SIGTERM"])
def test_an_agent_started_before_redis_waits_for_it_touching_nothing_until_it_holds_the_claim(
    fresh_redis_server, namespace, tmp_path, then
):
    """Under systemd the agent may start before redis-server: it waits for Redis with `run`'s
    backoff, saying so, and carves nothing on its empty GPU before it holds its claim; once Redis
    answers it claims the node, carves and publishes. A stop signal meanwhile ends it at once, exit 0.
    Exit 1 would read as a crash."""
    server = fresh_redis_server
    server.kill()  # not up yet (port and data dir kept for its start)
    agent, _, go = _slow_carving_agent(server, namespace, tmp_path, "--interval", "1")
    go.touch()
    lines, waiting, reader = _reading(agent, "waits for Redis")
    try:
        deadline = time.monotonic() + 60
        while not waiting.wait(0.1):
            assert agent.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(1.5)  # a few tries
        assert agent.poll() is None, "".join(lines)
        with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
            assert backend.instances(0) == [], "it carved before it held the node's claim"
        if then == "SIGTERM":
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        else:
            server.restart()
            alloc = Allocator(server.client(), namespace)
            _wait_until_carved_and_published(agent, alloc, lines, tmp_path)
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
        reader.join(10)
    finally:
        agent.kill()
    output = "".join(lines)
    assert agent.returncode == 0, output
    assert "agent stopped (signal 15)" in output


def test_a_gpu_whose_mig_mode_change_awaits_a_reset_is_named_in_the_agents_output_with_what_to_do(
    make_nvml_stub, redis_server, namespace, tmp_path
):
    """An A30 whose MIG mode was set on but not yet reset stays uncarved: without a word the user
    would see an agent that serves nothing there. The agent says which GPU, its modes and the fix;
    one whose MIG goes off at the next reset is carved (it still serves) and named too."""
    stub = make_nvml_stub("node-a=2xA30-24GB", mig_modes={0: (0, 1), 1: (1, 0)})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")}, **stub.env(),
        "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace, "PREFECT_MIG_NODE": "node-a",
        "PREFECT_MIG_STATE_DIR": str(tmp_path / "state"), "PREFECT_MIG_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "COLUMNS": "300",
    }
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--once"], env=env,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    with GpuBackend(stub.pynvml) as backend:
        gpus = backend.gpus()
    off, on = (f"GPU {g.index} (NVIDIA A30, {g.uuid})" for g in gpus)
    assert f"{off}: MIG mode is off, pending on" in output and "sudo nvidia-smi -i 0 -r" in output
    assert f"{on}: MIG mode is on, pending off" in output and "sudo nvidia-smi -i 1 -mig 1" in output
    assert output.count("pending on") == 1 and output.count("pending off") == 1, "one line per GPU"
    assert "prefect-mig doctor" in output
    assert f"carved GPU 1 (A30-24GB): {BALANCED}" in output and "carved GPU 0" not in output


def test_an_agent_on_the_auto_backend_with_a_gpu_driver_serves_this_host_not_a_simulated_node(
    make_nvml_stub, redis_server, namespace, tmp_path
):
    """With PREFECT_MIG_BACKEND=auto (the default) and a driver that answers, the agent read the real
    GPUs but published them as the simulated fleet's first node, node-a, not as this host."""
    import socket

    stub = make_nvml_stub("node-a=1xA30-24GB", layouts={0: BALANCED})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")}, **stub.env(),
        "PREFECT_MIG_BACKEND": "auto", "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_STATE_DIR": str(tmp_path / "state"), "PREFECT_MIG_GPU_LOCK_DIR": str(tmp_path / "locks"),
    }
    host = socket.gethostname()
    assert host != "node-a"
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--once"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"agent {host}: published 3 slice(s)" in done.stdout
    assert list(Allocator(redis_server.client(), namespace).status()["nodes"]) == [host]


def _mig_modes_named(caplog):
    """A function that returns the agent's warnings naming a GPU's MIG modes so far."""
    caplog.set_level(logging.WARNING, "prefect_mig.agent")
    return lambda: [r.getMessage() for r in caplog.records if ": MIG mode is " in r.getMessage()]


def _start_and_tick_twice(agent: NodeAgent, layout: str) -> None:
    """Start `agent` with layout config `layout` ("none": no carve), then run two rounds."""
    if layout == "none":
        agent.start()
    else:
        agent.start(LayoutConfigs.load(), layout)
        agent.carve_empty(LayoutConfigs.load(), layout)  # what a first round tried again does
    agent.tick()
    agent.tick()


@pytest.mark.parametrize("layout", ["none", "balanced"])
def test_a_pending_mig_mode_change_is_named_once_per_gpu_and_per_change_whatever_the_agent_does(
    alloc, tmp_path, caplog, layout
):
    """Whether the agent carves (a first round tried again carves again) or not (--layout none), a
    GPU whose MIG mode change awaits a reset serves nothing (or loses its slices at the reset): the
    agent names it once, not at every round, and again when the modes change again (the change
    undone, then made again)."""
    nvml = SimulatedNvml("node-a=2xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(1), 0)
        nvml.stage_mig_mode(0, 0)  # GPU 0: on, pending off
        nvml.stage_mig_mode(1, 1)  # GPU 1: off, pending on
        first, second = (g.uuid for g in backend.gpus())
        agent = NodeAgent(backend, alloc, node="node-a")
        named = _mig_modes_named(caplog)
        _start_and_tick_twice(agent, layout)
        assert len(named()) == 2, named()
        assert f"GPU 0 (NVIDIA A30, {first}): MIG mode is on, pending off" in named()[0]
        assert f"GPU 1 (NVIDIA A30, {second}): MIG mode is off, pending on" in named()[1]
        nvml.stage_mig_mode(1, 0)  # undone: MIG plainly off, named as such
        agent.tick()
        nvml.stage_mig_mode(1, 1)  # made again
        agent.tick()
        agent.tick()
        assert len(named()) == 4, named()
        assert named()[2].startswith(f"GPU 1 (NVIDIA A30, {second}): MIG mode is off (current and pending)")
        assert named()[3].startswith(f"GPU 1 (NVIDIA A30, {second}): MIG mode is off, pending on")


@pytest.mark.parametrize("layout", ["none", "balanced"])
def test_a_gpu_with_mig_off_is_named_with_the_fix_once_per_change_whatever_the_agent_does(
    alloc, tmp_path, caplog, layout
):
    """A user who forgot `nvidia-smi -mig 1` on a GPU sees an agent that serves nothing there: the
    agent names that GPU once (not at every round), with the command that turns MIG on and the
    reset an A100/A30 also needs, and again only when MIG is off again after being on."""
    nvml = SimulatedNvml("node-a=2xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(1), 0)  # GPU 1: off, pending off
        second = backend.gpus()[1].uuid
        agent = NodeAgent(backend, alloc, node="node-a")
        named = _mig_modes_named(caplog)
        _start_and_tick_twice(agent, layout)
        assert len(named()) == 1, named()
        assert named()[0].startswith(f"GPU 1 (NVIDIA A30, {second}): MIG mode is off (current and pending), "
                                     "so the agent serves no slices there")
        assert "sudo nvidia-smi -i 1 -mig 1" in named()[0] and "sudo nvidia-smi -i 1 -r" in named()[0]
        assert "A100/A30" in named()[0] and "prefect-mig doctor" in named()[0]
        nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(1), 1)  # turned on: nothing to say
        agent.tick()
        assert len(named()) == 1, named()
        nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(1), 0)  # off again: named again
        agent.tick()
        agent.tick()
        assert len(named()) == 2 and named()[1] == named()[0], named()


def test_a_gpu_without_mig_at_all_is_not_given_the_fix_for_mig_mode_off(make_nvml_stub, alloc, caplog):
    """NVML answers NotSupported for the MIG mode of a GPU without MIG (an L4 beside the A30s):
    `nvidia-smi -mig 1` would fail there, so the agent says only that it serves nothing there."""
    stub = make_nvml_stub("node-a=2xA30-24GB", device_names={1: "NVIDIA L4"}, without_mig={1})
    with GpuBackend(stub.pynvml) as backend:
        second = backend.gpus()[1]
        assert not (second.mig_supported or second.mig_enabled) and backend.gpus()[0].mig_supported
        agent = NodeAgent(backend, alloc, node="node-a")
        caplog.set_level(logging.INFO, "prefect_mig.agent")
        agent.start()
        agent.tick()
    said = [r.getMessage() for r in caplog.records if f"GPU 1 (NVIDIA L4, {second.uuid})" in r.getMessage()]
    assert said == [f"GPU 1 (NVIDIA L4, {second.uuid}) has no MIG, so the agent serves nothing there"], said


def test_an_agent_given_a_layout_config_the_file_lacks_says_so_at_once_even_while_redis_is_down(
    fresh_redis_server, namespace, tmp_path
):
    """A typo in --layout is bad input: exit 2 naming it and the configs there, before the agent
    claims the node or waits for Redis (else a user would see it wait, then fail much later)."""
    server = fresh_redis_server
    server.kill()
    env = {
        **os.environ, "PREFECT_MIG_REDIS_URL": server.url, "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(tmp_path), "COLUMNS": "300",
    }
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "agent", "--node", "node-a", "--layout",
                           "balancd"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'balancd'" in done.stderr and "balanced" in done.stderr and "--layout" in done.stderr
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        assert backend.instances(0) == []
