"""The local cluster: `prefect-mig up`/`down`, the supervised background agent, and the README's
first flow run exactly as written in a fresh state dir with nothing started before it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefect_mig.local_cluster import LocalCluster
from prefect_mig.settings import Settings
from tests.test_embedded_redis import redis_servers_of

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def fresh_env(tmp_path, redis_server):  # redis_server: skips (or fails under CI) without redis-server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_MIG_"))}
    env |= {
        "PREFECT_MIG_STATE_DIR": str(tmp_path / "state"),
        "PREFECT_MIG_BACKEND": "simulated",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded 2-core machine
        "COLUMNS": "150",
    }
    yield env
    subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "down"], env=env, capture_output=True, timeout=120)


def _cli(*args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_until(check, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.3)


def test_up_starts_a_supervised_agent_carved_to_the_default_and_down_stops_everything(fresh_env):
    state = Path(fresh_env["PREFECT_MIG_STATE_DIR"])
    first = _cli("up", "--json", env=fresh_env)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout)
    assert report["started"] and report["repartitioner"] and report["nodes"] == ["node-a"]
    assert [g["layout"] for g in report["gpus"]] == ["2g.20gb@0 + 1g.10gb@2 + 1g.10gb@3 + 3g.40gb@4"] * 2  # balanced
    supervisor = report["supervisor_pid"]
    again = json.loads(_cli("up", "--json", env=fresh_env).stdout)
    assert again["started"] is False and again["supervisor_pid"] == supervisor
    status = json.loads(_cli("status", "--json", env=fresh_env).stdout)
    assert status["agents"]["node-a"]["stale"] is False
    _wait_until(lambda: len(_children(supervisor)) == 2)  # the agent and the repartitioner
    children = _children(supervisor)
    os.kill(children[0], signal.SIGKILL)  # a child dies: the supervisor starts it again
    _wait_until(lambda: "restarting" in Path(report["log"]).read_text() and len(_children(supervisor)) == 2)
    down = _cli("down", env=fresh_env)
    assert down.returncode == 0 and "stopped the background agent" in down.stdout and "redis-server" in down.stdout
    assert not _alive(supervisor) and not any(_alive(c) for c in _children(supervisor) + children)
    assert redis_servers_of(state) == []
    after = _cli("status", env=fresh_env)  # a look after `down` starts nothing again
    assert after.returncode == 1 and "the local cluster is not running" in after.stderr and "prefect-mig up" in after.stderr
    assert redis_servers_of(state) == []


def test_down_while_leases_are_held_says_so_naming_their_holders(fresh_env):
    """A new-user trial: `prefect-mig down` while a flow's tasks ran said only that it stopped the
    cluster; the tasks failed a minute later, and nothing had said that they held slices."""
    assert _cli("up", env=fresh_env).returncode == 0
    held = _cli("lease", "acquire", "--profile", "1g.10gb", "--holder", "flow/train", "--timeout", "60", env=fresh_env)
    assert held.returncode == 0, held.stdout + held.stderr
    down = _cli("down", env=fresh_env)
    assert down.returncode == 0 and "stopped the embedded redis-server" in down.stdout
    said = " ".join((down.stdout + down.stderr).split())
    assert "1 live lease" in said and "flow/train" in said, said


def test_a_flow_started_right_after_down_starts_the_local_cluster_again(fresh_env, monkeypatch):
    """A new-user trial: for the agent's heartbeat TTL (30 s) after `prefect-mig down` its last
    heartbeat still looked alive, so a flow's first MIG task started no local cluster and waited
    (an hour by default) saying that no node agent is alive."""
    assert _cli("up", env=fresh_env).returncode == 0
    assert _cli("down", env=fresh_env).returncode == 0
    for key, value in fresh_env.items():
        monkeypatch.setenv(key, value)
    from prefect_mig.cli.leases import _allocator
    from prefect_mig.integrations.prefect.runner import _ensure_local_agent
    from prefect_mig.settings import load_settings

    settings = load_settings()
    local = LocalCluster(settings)
    assert local.pid() is None
    _ensure_local_agent(settings, _allocator(), None)  # what a flow's first MIG task does
    assert local.pid() is not None
    status = json.loads(_cli("status", "--json", env=fresh_env).stdout)
    assert status["agents"]["node-a"]["stale"] is False


def test_many_threads_asking_for_the_local_cluster_at_once_start_one_supervisor(fresh_env, monkeypatch):
    for key, value in fresh_env.items():
        monkeypatch.setenv(key, value)
    local = LocalCluster(Settings(state_dir=fresh_env["PREFECT_MIG_STATE_DIR"], backend="simulated"))
    got: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda: got.append(local.ensure(repartition=False))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len({pid for pid, _ in got}) == 1 and sum(started for _, started in got) == 1
    assert local.stop() is True and local.pid() is None


def _readme_first_flow() -> str:
    text = README.read_text()
    section = text[text.index("## Your first flow"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_first_flow_runs_as_written_with_nothing_started_before_it(fresh_env, tmp_path, python_image):
    script = tmp_path / "first_flow.py"
    script.write_text(_readme_first_flow())
    assert "square.map(range(10))" in script.read_text()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=fresh_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"^\d+ MIG-", line)]
    assert sorted(int(v) for v, _ in rows) == sorted(x * x for x in range(10))
    assert len({m for _, m in rows}) >= 2  # spread over several slices
    assert "started the local cluster in the background" in done.stdout + done.stderr


def test_with_up_a_kind_no_gpu_is_carved_into_queues_and_gets_carved(fresh_env):
    assert _cli("up", env=fresh_env).returncode == 0
    got = _cli("lease", "acquire", "--profile", "7g.80gb", "--timeout", "240", "--json", env=fresh_env, timeout=300)
    assert got.returncode == 0, got.stderr
    lease = json.loads(got.stdout)
    assert lease["slice"]["profile"] == "7g.80gb"
    assert _cli("lease", "release", lease["lease_id"], "--fence", str(lease["fence"]), env=fresh_env).returncode == 0


def _processes_of(state: Path) -> list[int]:
    """Pids of the processes started for `state` (their environment names it), redis-server included."""
    wanted = f"PREFECT_MIG_STATE_DIR={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if wanted in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_sigkilled_supervisor_takes_its_agent_and_repartitioner_with_it_and_down_leaves_nothing(fresh_env):
    state = Path(fresh_env["PREFECT_MIG_STATE_DIR"])
    first = _cli("up", "--json", "--interval", "1", env=fresh_env)
    assert first.returncode == 0, first.stdout + first.stderr
    supervisor = json.loads(first.stdout)["supervisor_pid"]
    _wait_until(lambda: len(_children(supervisor)) == 2)  # the agent and the repartitioner
    children = _children(supervisor)
    os.kill(supervisor, signal.SIGKILL)
    _wait_until(lambda: not any(_alive(c) for c in children), timeout_s=30)  # no orphan keeps running
    second = _cli("up", "--json", "--interval", "1", env=fresh_env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout)["started"] is True
    assert _cli("down", env=fresh_env).returncode == 0
    _wait_until(lambda: _processes_of(state) == [], timeout_s=30)


def test_down_with_a_stale_pid_file_naming_another_state_dirs_supervisor_leaves_that_cluster_running(fresh_env, tmp_path):
    live = _cli("up", "--json", "--no-repartition", "--interval", "1", env=fresh_env)
    assert live.returncode == 0, live.stdout + live.stderr
    supervisor = json.loads(live.stdout)["supervisor_pid"]
    _wait_until(lambda: len(_children(supervisor)) == 1)
    agent = _children(supervisor)[0]
    other = fresh_env | {"PREFECT_MIG_STATE_DIR": str(tmp_path / "other")}
    stale = tmp_path / "other" / "local"
    stale.mkdir(parents=True, mode=0o700)
    (stale / "supervisor.pid").write_text(str(supervisor))  # a pid since reused by another cluster's supervisor
    assert LocalCluster(Settings(state_dir=tmp_path / "other", backend="simulated")).pid() is None
    down = _cli("down", "--json", env=other)
    assert down.returncode == 0 and json.loads(down.stdout)["agents_stopped"] is False
    time.sleep(2)  # `down` waits for what it stops to exit before it returns; this covers a signal sent without that wait
    assert _alive(supervisor) and _alive(agent)


def test_down_stops_what_a_killed_supervisor_left_in_its_process_group(fresh_env):
    state = Path(fresh_env["PREFECT_MIG_STATE_DIR"])
    up = _cli("up", "--json", "--no-repartition", "--interval", "1", env=fresh_env)
    assert up.returncode == 0, up.stdout + up.stderr
    supervisor = json.loads(up.stdout)["supervisor_pid"]
    _wait_until(lambda: len(_children(supervisor)) == 1)
    agent = _children(supervisor)[0]
    os.kill(agent, signal.SIGSTOP)  # a hung agent: the parent-death signal waits until it runs again
    os.kill(supervisor, signal.SIGKILL)
    _wait_until(lambda: not _alive(supervisor), timeout_s=30)
    assert _alive(agent)
    down = _cli("down", "--json", env=fresh_env)
    assert down.returncode == 0 and json.loads(down.stdout)["agents_stopped"] is True
    _wait_until(lambda: _processes_of(state) == [], timeout_s=30)


def test_the_demo_refuses_to_run_beside_a_local_cluster_of_its_state_dir_and_carves_nothing(fresh_env):
    """A new-user trial ran `prefect-mig demo` after a flow had started the local cluster (as the
    README's first flow does): the demo carved and published the (simulated) GPUs to its own Redis,
    the local cluster's agent and repartitioner re-carved them under it, and the demo's 3g fine-tune
    waited for good."""
    up = _cli("up", "--json", env=fresh_env)
    assert up.returncode == 0, up.stdout + up.stderr
    report = json.loads(up.stdout)
    before = [g["layout"] for g in report["gpus"]]
    demo = _cli("demo", "--no-pipeline", env=fresh_env)
    assert demo.returncode == 2, demo.stdout + demo.stderr
    assert f"supervisor pid {report['supervisor_pid']}" in demo.stderr and "prefect-mig down" in demo.stderr, demo.stderr
    after = json.loads(_cli("up", "--json", env=fresh_env).stdout)
    assert [g["layout"] for g in after["gpus"]] == before  # nothing carved


def test_up_waits_for_the_new_agents_own_heartbeat_not_the_fresh_one_of_the_agent_before_it(alloc, tmp_path):
    """`up` right after `down` returned once the new agent held its node claim: the agent before it
    had heartbeated a moment ago, so a flow started then could find the node out of service when
    that beat lapsed before the new agent's first one (a slow first carve)."""
    from prefect_mig.allocator import health
    from prefect_mig.errors import ConfigError
    from prefect_mig.node_claim import NodeClaim

    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    before = NodeClaim(alloc, "node-a", ttl_s=30)
    before.take()
    alloc.heartbeat("node-a", ttl_s=30, agent=before.held_as())
    before.release()  # `down` stopped it cleanly: its claim given back, its last beat still fresh
    new = NodeClaim(alloc, "node-a", ttl_s=30)
    new.take()
    local = LocalCluster(Settings(state_dir=tmp_path / "state", backend="simulated"))
    with pytest.raises(ConfigError, match=r"the node agent for node-a did not heartbeat .* within 1 s"):
        local.wait_for_agents(alloc, ["node-a"], timeout_s=1)
    assert not health.serving(alloc, ["node-a"])
    alloc.heartbeat("node-a", ttl_s=30, agent=new.held_as())
    local.wait_for_agents(alloc, ["node-a"], timeout_s=5)
    assert health.serving(alloc, ["node-a"])
