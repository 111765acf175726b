"""The embedded redis-server as another local user sees it: no way in without the password, and no
file under the state dir it may read."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from prefect_mig.allocator.embedded import embedded_dir, ensure_embedded_redis, stop_embedded_redis
from tests.test_embedded_redis import redis_servers_of


@pytest.fixture
def state_dir(tmp_path, redis_server):  # redis_server: skips (or fails under CI) without redis-server
    yield tmp_path
    stop_embedded_redis(tmp_path)


def test_without_the_password_nobody_gets_in(state_dir):
    url = ensure_embedded_redis(state_dir)
    owner = redis.Redis.from_url(url)
    assert owner.ping() and owner.set("probe", "1")
    port = owner.connection_pool.connection_kwargs["port"]
    for stranger in (redis.Redis(host="127.0.0.1", port=port), redis.Redis(host="127.0.0.1", port=port, password="guess")):
        with pytest.raises(redis.exceptions.AuthenticationError):
            stranger.flushall()
    assert owner.get("probe") == b"1"


def test_everything_under_the_state_dir_is_private_and_the_password_is_not_on_a_command_line(state_dir):
    url = ensure_embedded_redis(state_dir)
    redis.Redis.from_url(url).set("k", "v")  # makes the AOF write something
    password = redis.Redis.from_url(url).connection_pool.connection_kwargs["password"]
    home = embedded_dir(state_dir)
    paths = [home, *home.rglob("*")]
    assert any(p.name == "url" for p in paths) and any("appendonly" in p.name for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    for pid in redis_servers_of(state_dir):
        assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def _cli(state_dir):
    """``prefect-mig <args>`` in a subprocess, on `state_dir`, a simulated A30 and the embedded Redis."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_MIG_STATE_DIR": str(state_dir), "PREFECT_MIG_BACKEND": "simulated",
           "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB"}
    env.pop("PREFECT_MIG_REDIS_URL", None)
    return lambda *a: subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", *a], capture_output=True, text=True, env=env, timeout=180)


def test_up_does_not_print_the_password(state_dir):
    import json

    run = _cli(state_dir)
    try:
        up = run("up", "--json")
        assert up.returncode == 0, up.stderr
        password = (embedded_dir(state_dir) / "password").read_text().strip()
        assert password not in up.stdout + up.stderr
        assert json.loads(up.stdout)["redis_url"].startswith("redis://prefect-mig:***@127.0.0.1:")
    finally:
        run("down")


def test_a_new_state_dir_and_everything_the_local_cluster_writes_in_it_is_private(tmp_path, redis_server):
    """The state dir holds the password, the AOF, the cluster's log and the simulated GPUs: as
    another local user, nothing under a state dir the project created may be read or listed."""
    state_dir = tmp_path / "fresh" / "state"  # neither exists yet
    run = _cli(state_dir)
    try:
        up = run("up", "--json")
        assert up.returncode == 0, up.stderr
        assert run("status").returncode == 0
        paths = [state_dir.parent, state_dir, *state_dir.rglob("*")]
        assert any("simulated-nvml" in p.name for p in paths) and any(p.name == "cluster.log" for p in paths)
        for path in paths:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    finally:
        run("down")


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address if width == 32 else ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_the_embedded_server_listens_on_the_loopback_address_only(state_dir):
    url = ensure_embedded_redis(state_dir)
    port = redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]
    assert _listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0, not any IPv6 address
