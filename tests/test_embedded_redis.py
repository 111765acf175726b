"""The embedded redis-server: one per state dir whatever the concurrency, and `redis stop` stops it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prefect_mig.allocator.embedded import embedded_dir, ensure_embedded_redis, stop_embedded_redis

_START = "import sys; from pathlib import Path; from prefect_mig.allocator.embedded import ensure_embedded_redis as e; print(e(Path(sys.argv[1])))"


def redis_servers_of(state_dir: Path) -> list[int]:
    """Pids of the redis-server processes whose data dir is under `state_dir` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "redis-server":
                continue
            if (proc / "cwd").resolve() == embedded_dir(state_dir).resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture
def state_dir(tmp_path, redis_server):  # redis_server: skips (or fails under CI) without redis-server
    yield tmp_path
    stop_embedded_redis(tmp_path)


def test_many_threads_and_processes_starting_it_at_once_start_one_server(state_dir):
    procs = [
        subprocess.Popen([sys.executable, "-c", _START, str(state_dir)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    urls: list[str] = []
    threads = [threading.Thread(target=lambda: urls.append(ensure_embedded_redis(state_dir))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        urls.append(out.strip())
    assert len(urls) == 14 and len(set(urls)) == 1
    assert len(redis_servers_of(state_dir)) == 1


def test_redis_stop_stops_what_was_started_and_leaves_nothing(state_dir):
    first = ensure_embedded_redis(state_dir)
    assert ensure_embedded_redis(state_dir) == first  # found, not started again
    assert len(redis_servers_of(state_dir)) == 1
    assert stop_embedded_redis(state_dir) is True
    assert redis_servers_of(state_dir) == []
    assert stop_embedded_redis(state_dir) is False


def test_a_restarted_server_keeps_its_url_so_a_saved_one_still_works(state_dir):
    """Found by a new-user trial: a MigCluster block saved from the embedded default
    (`blocks/create_defaults.py`) named its port, and after `prefect-mig down` and `up` every lease
    through the block failed with "Connection refused": the server came back on a new random port."""
    first = ensure_embedded_redis(state_dir)
    assert stop_embedded_redis(state_dir) is True
    assert ensure_embedded_redis(state_dir) == first


def test_a_long_running_client_follows_the_server_to_its_new_port(state_dir, monkeypatch):
    from prefect_mig.cli.leases import _allocator

    monkeypatch.delenv("PREFECT_MIG_REDIS_URL", raising=False)
    monkeypatch.setenv("PREFECT_MIG_STATE_DIR", str(state_dir))
    alloc = _allocator()  # as `api serve` and `agent` hold it for their lifetime
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    first = ensure_embedded_redis(state_dir)
    stop_embedded_redis(state_dir)
    with socket.socket() as taken:  # its port taken meanwhile: it comes back on another
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old server's TIME_WAITs
        taken.bind(("127.0.0.1", int(first.rsplit(":", 1)[1].split("/")[0])))
        taken.listen()
        second = ensure_embedded_redis(state_dir)  # restarted, by anyone, on a new port
    assert second != first
    # the client needed no restart, and what it wrote came back from the AOF under the locked-down ACL
    assert [s["profile"] for s in alloc.status()["slices"]] == ["4g.24gb"]


def test_a_stale_pid_file_never_gets_another_process_signalled(state_dir):
    """A redis-server killed with SIGKILL (or a reboot) leaves its pid file; that pid may be any
    process of this user by the time the state dir is used again. Neither starting the server nor
    stopping it signals that process."""
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        home = embedded_dir(state_dir)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "redis.pid").write_text(f"{bystander.pid}\n")
        assert stop_embedded_redis(state_dir) is False  # nothing of ours was running
        (home / "redis.pid").write_text(f"{bystander.pid}\n")
        ensure_embedded_redis(state_dir)  # starts ours, past the stale file
        assert len(redis_servers_of(state_dir)) == 1
        assert bystander.poll() is None, "the process a stale pid file named was signalled"
        assert stop_embedded_redis(state_dir) is True and redis_servers_of(state_dir) == []
    finally:
        bystander.kill()
        bystander.wait()
