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
from contextlib import contextmanager
from pathlib import Path

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


def test_real_gpus_lock_where_the_settings_say_else_roots_in_run_and_other_users_in_tmp_looking_at_run(tmp_path):
    from prefect_mig.gpu.host_lock import LockDirs, lock_dirs

    real = GpuBackend()  # the real NVML's backend, never initialized: only its kind matters here
    run, tmp = tmp_path / "run" / "gpu-locks", tmp_path / "tmp" / "gpu-locks"
    assert lock_dirs(real, tmp_path / "mine") == LockDirs([tmp_path / "mine"], "shared", [])
    assert lock_dirs(real, None, root_dir=run, shared_dir=tmp, euid=0) == LockDirs([run], "root", [])
    assert lock_dirs(real, None, root_dir=run, shared_dir=tmp, euid=1000) == LockDirs([tmp], "shared", [run])
    simulated = GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path / "state"))
    assert lock_dirs(simulated, tmp_path / "mine") == LockDirs([tmp_path / "state" / "gpu-locks"], "private", [])


# Another local user against the host-wide lock dirs: a process of the user nobody (uid 65534), started by the test.
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starts a process of another user (needs root)")


@pytest.fixture
def host():
    """(/run's and /tmp's lock dirs, as a host has them) in a directory every user can reach: /run's
    is made by the code under test, /tmp's exists, sticky and world-writable."""
    import shutil
    import tempfile

    def reachable(path: Path) -> bool:  # every user may pass through it and its parents (this host's /tmp is 0700)
        return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))

    base = next((d for d in map(Path, (tempfile.gettempdir(), "/var/tmp", "/dev/shm")) if d.is_dir() and reachable(d)), None)
    if base is None:
        pytest.skip("no temp dir that every user may reach")
    world = Path(tempfile.mkdtemp(prefix="pmig-host-lock-", dir=base))
    world.chmod(0o755)
    shared = world / "tmp-gpu-locks"
    shared.mkdir()
    shared.chmod(0o1777)
    try:
        yield world / "run" / "gpu-locks", shared
    finally:
        shutil.rmtree(world, ignore_errors=True)


def _nobodys_python(*, with_checkout: bool) -> tuple[str, dict]:
    """A Python interpreter that the user nobody may run (a venv under /root may be out of its reach), and
    its environment; `with_checkout`: of this version, with this checkout and its packages on its path
    (skips the test where nobody may not read them, as in a clone under a private /tmp)."""
    import site

    checkout = str(Path(__file__).resolve().parents[1])
    env = {"PATH": os.environ.get("PATH", "")}
    if with_checkout:
        env["PYTHONPATH"] = os.pathsep.join([checkout, *site.getsitepackages()])
    probe = "import sys; print(tuple(sys.version_info[:2]))" + ("; import prefect_mig.gpu.host_lock" if with_checkout else "")
    for python in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"]):
        try:
            ran = subprocess.run([python, "-c", probe], user=NOBODY, group=NOBODY, extra_groups=[], env=env,
                                 capture_output=True, text=True, timeout=60, cwd="/")
        except OSError:
            continue
        if ran.returncode == 0 and (not with_checkout or ran.stdout.strip() == str(tuple(sys.version_info[:2]))):
            return python, env
    pytest.skip("the user nobody may run no Python interpreter" + (f" of this version with {checkout}" if with_checkout else ""))


@contextmanager
def _as_nobody(code: str, *, with_checkout: bool = False):
    """A Python process of the user nobody running `code`, until it printed ``ready`` and while the block runs."""
    python, env = _nobodys_python(with_checkout=with_checkout)
    proc = subprocess.Popen([python, "-c", code], user=NOBODY, group=NOBODY, extra_groups=[], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


HOLD = """import fcntl, os, sys, time
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{{"pid": 1, "what": "prefect-mig agent"}}')  # lies about who holds it
print("ready", flush=True)
time.sleep(600)
"""


@needs_root
def test_another_user_holding_a_gpus_lock_file_in_tmp_does_not_keep_a_root_agent_off_the_gpu(host):
    """Any user can make and flock /tmp's lock file of a GPU first (denial of service): a root agent
    locks where only root can, so it starts; another root process is still refused."""
    from prefect_mig.errors import GpuHeld
    from prefect_mig.gpu.host_lock import GpuLocks, lock_dirs

    run, shared = host
    with _as_nobody(HOLD.format(path=str(shared / "GPU-1.lock"))):
        where = lock_dirs(GpuBackend(), None, root_dir=run, shared_dir=shared)
        with GpuLocks(where.lock, ["GPU-1"], what="prefect-mig agent", mode=where.mode, watch=where.watch):
            assert (run / "GPU-1.lock").stat().st_mode & 0o777 == 0o600  # nobody else may open it, so hold it
            assert run.stat().st_mode & 0o777 == 0o755 and run.stat().st_uid == 0
            with pytest.raises(GpuHeld) as refused, GpuLocks(where.lock, ["GPU-1"], what="prefect-mig demo",
                                                             mode=where.mode, watch=where.watch):
                pass
    assert refused.value.pid == os.getpid() and refused.value.what == "prefect-mig agent"


@needs_root
def test_another_users_process_is_refused_while_a_root_agent_serves_the_gpu_naming_its_pid(host):
    """A process of another user cannot open root's lock file, but still meets the root agent's lock
    (in /proc/locks) and refuses, naming it."""
    from prefect_mig.gpu.host_lock import GpuLocks

    run, shared = host
    user_process = f"""from prefect_mig.errors import GpuHeld
from prefect_mig.gpu import GpuBackend
from prefect_mig.gpu.host_lock import GpuLocks, lock_dirs
where = lock_dirs(GpuBackend(), None, root_dir={str(run)!r}, shared_dir={str(shared)!r})
print("ready", flush=True)
try:
    with GpuLocks(where.lock, ["GPU-1"], what="prefect-mig demo", mode=where.mode, watch=where.watch):
        print("served it")
except GpuHeld as held:
    print("refused:", held)
"""
    with GpuLocks([run], ["GPU-1"], what="prefect-mig agent", mode="root", about={"namespace": "prod"}):
        with _as_nobody(user_process, with_checkout=True) as user:
            said, err = user.communicate(timeout=60)
    assert "served it" not in said, said + err
    said = " ".join(said.split())
    assert "refused: GPU GPU-1 is served by another process on this host:" in said, said + err
    assert f"(pid {os.getpid()}, user root (uid 0))" in said and f"kill {os.getpid()}" in said, said
    with _as_nobody(user_process, with_checkout=True) as user:  # once the root agent stopped, the user's process serves it
        said, err = user.communicate(timeout=60)
    assert "served it" in said, said + err


@needs_root
def test_a_symlink_another_user_put_in_place_of_a_gpus_lock_file_is_refused_and_its_target_left_alone(host):
    """Before, the agent opened the lock file through the link and wrote its pid over the file it
    names (any file, for a root agent)."""
    from prefect_mig.errors import GpuLockUntrusted
    from prefect_mig.gpu.host_lock import GpuLocks

    _, shared = host
    precious = shared.parent / "precious"
    precious.write_text("root's own data")
    link = shared / "GPU-1.lock"
    with _as_nobody(f"import os; os.symlink({str(precious)!r}, {str(link)!r}); print('ready', flush=True)") as planted:
        planted.wait(30)
    assert link.is_symlink()
    with pytest.raises(GpuLockUntrusted) as refused, GpuLocks([shared], ["GPU-1"], what="prefect-mig agent"):
        pass
    assert precious.read_text() == "root's own data"
    said = str(refused.value)
    assert str(link) in said and "symbolic link" in said and "nobody (uid 65534)" in said, said
    assert "PREFECT_MIG_GPU_LOCK_DIR" in said


@needs_root
def test_a_lock_dir_another_user_made_is_refused_naming_it_and_its_owner(host):
    """The owner of the directory can remove a held lock file, and a second process then locks a new one."""
    from prefect_mig.errors import GpuLockUntrusted
    from prefect_mig.gpu.host_lock import GpuLocks

    _, shared = host
    theirs = shared / "made-by-nobody"
    with _as_nobody(f"import os; os.mkdir({str(theirs)!r}, 0o777); os.chmod({str(theirs)!r}, 0o777); "
                    "print('ready', flush=True)") as made:
        made.wait(30)
    with pytest.raises(GpuLockUntrusted) as refused, GpuLocks([theirs], ["GPU-1"], what="prefect-mig agent"):
        pass
    assert refused.value.path == str(theirs) and refused.value.owner == "nobody (uid 65534)"
    assert list(theirs.iterdir()) == []  # locked nothing there


@needs_root
def test_roots_lock_dir_an_older_version_left_open_to_all_is_closed_and_another_users_lock_file_there_refused(host):
    """An older version made /run's lock dir sticky and world-writable, as /tmp's, and any user's process
    could lock there: the dir is made root's alone again; a file another user left there is refused,
    naming it and its owner, rather than waited for."""
    from prefect_mig.errors import GpuLockUntrusted
    from prefect_mig.gpu.host_lock import GpuLocks

    run, _ = host
    run.mkdir(parents=True)
    run.chmod(0o1777)
    with _as_nobody(f"open({str(run / 'GPU-2.lock')!r}, 'w').close(); print('ready', flush=True)") as left:
        left.wait(30)
    with GpuLocks([run], ["GPU-1"], what="prefect-mig agent", mode="root"):
        assert run.stat().st_mode & 0o7777 == 0o755
    with pytest.raises(GpuLockUntrusted) as refused, GpuLocks([run], ["GPU-1", "GPU-2"], what="prefect-mig agent",
                                                              mode="root"):
        pass
    assert refused.value.path == str(run / "GPU-2.lock") and refused.value.owner == "nobody (uid 65534)"
    with GpuLocks([run], ["GPU-1"], what="prefect-mig agent", mode="root"):
        pass  # the refusal left nothing held
