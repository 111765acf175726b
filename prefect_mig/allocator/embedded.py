"""The embedded default: a private redis-server under the state dir when no Redis URL is set.

It runs daemonized (AOF on, bound to 127.0.0.1) so leases taken by one ``prefect-mig`` command are
still there for the next; ``prefect-mig redis stop`` (or ``prefect-mig down``) stops it. However many
threads and processes ask for it at once, one server starts per state dir (a lock file decides).

Other local users cannot use it: the default user is off and the project's ACL user ``prefect-mig``
has a generated password, kept (with the URL that carries it) in files only the owner may read;
the password reaches redis-server through a 0600 config file, never its command line; everything
under ``<state_dir>/redis`` is created 0600 (files) and 0700 (dirs).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from prefect_mig.errors import ConfigError, RedisUnavailable
from prefect_mig.state_dir import open_private, private_dir, write_private


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _previous_port(home: Path) -> int | None:
    """The port of the server's last start (its config stays), if nothing listens on it now: a URL
    saved from it (a MigCluster block, a copied PREFECT_MIG_REDIS_URL) keeps working after `down`
    and `up`."""
    try:
        port = next(int(line.split()[1]) for line in (home / "redis.conf").read_text().splitlines()
                    if line.startswith("port "))
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds: past TIME_WAITs
            s.bind(("127.0.0.1", port))
            s.listen()
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return port


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def embedded_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "redis"


USER = "prefect-mig"


def _password(home: Path) -> str:
    """The project user's password, generated once per state dir."""
    path = home / "password"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


@contextmanager
def state_lock(state_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock on ``<state_dir>/<name>.lock`` across threads and processes.

    ``flock`` locks belong to an open file, and each call opens its own, so two threads of one
    process exclude each other as two processes do; the lock goes with the process if it dies.
    """
    path = Path(state_dir) / f"{name}.lock"
    private_dir(path.parent)
    with open_private(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _live_url(url_file: Path) -> str | None:
    url = url_file.read_text().strip() if url_file.exists() else ""
    return url if url and _answers(url) else None


def _pid_alive(pid_file: Path) -> int | None:
    """The pid in `pid_file` if it is this state dir's redis-server and alive, else None.

    A pid file outlives its server (a SIGKILL, a reboot), and its pid may then be any process of
    this user: only a redis-server whose working directory is the pid file's (its config's
    ``dir``) is ours, so a stale file never gets another process signalled."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        proc = Path(f"/proc/{pid}")
        argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].split(b" ")[0]
        ours = os.path.basename(argv0).startswith(b"redis-server") and (proc / "cwd").resolve() == pid_file.parent.resolve()
    except (OSError, ValueError):
        return None
    return pid if ours else None


def ensure_embedded_redis(state_dir: Path) -> str:
    """The URL of the embedded redis-server, started if it is not running.

    Any number of threads and processes may call this at once for one state dir: they start one
    server (under a lock file in the state dir) and all get its URL.

    Raises:
        ConfigError: ``redis-server`` is not installed (says what to install, or to set a URL).
        RedisUnavailable: it did not come up (the message points at its log).
    """
    home = embedded_dir(state_dir)
    url_file = home / "url"
    url = _live_url(url_file)
    if url:
        return url
    with state_lock(home, "start"):
        url = _live_url(url_file)  # another thread or process started it while we waited
        if url:
            return url
        return _start(home, url_file)


def _start(home: Path, url_file: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "PREFECT_MIG_REDIS_URL is not set and redis-server is not installed for the embedded "
            "default: install it (apt-get install redis-server) or set PREFECT_MIG_REDIS_URL.",
            field="redis_url",
        )
    _terminate(home / "redis.pid")  # one that no longer answers
    port = _previous_port(home) or _free_port()
    password = _password(home)
    url = f"redis://{USER}:{password}@127.0.0.1:{port}/0"
    config = home / "redis.conf"
    write_private(config, "\n".join([
        f"port {port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        f'dir "{home}"',
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "daemonize yes",
        f'pidfile "{home / "redis.pid"}"',
        f'logfile "{home / "redis.log"}"',
        "user default off ~* &* +@all",  # off for clients; Redis 7.0 replays the AOF with its rights
        f"user {USER} on >{password} ~* &* +@all",
        "",
    ]))
    subprocess.run([binary, str(config)], check=True, umask=0o077)
    deadline = time.monotonic() + 10
    while not _answers(url):
        if time.monotonic() > deadline:
            _terminate(home / "redis.pid")
            raise RedisUnavailable(f"the embedded redis-server did not start; see {home / 'redis.log'}.")
        time.sleep(0.05)
    write_private(url_file, url)
    return url


def _terminate(pid_file: Path, timeout_s: float = 10.0) -> bool:
    """SIGTERM the process named in `pid_file` (if alive) and wait for it to end."""
    pid = _pid_alive(pid_file)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid_file) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def stop_embedded_redis(state_dir: Path) -> bool:
    """Stop the embedded server (after an AOF rewrite); False if none was running."""
    home = embedded_dir(state_dir)
    url_file = home / "url"
    with state_lock(home, "start"):
        url = _live_url(url_file)
        if url:
            try:
                redis.Redis.from_url(url).shutdown(save=False)
            except redis.ConnectionError:
                pass
        stopped = _terminate(home / "redis.pid") or url is not None
        url_file.unlink(missing_ok=True)
    return stopped


def running_embedded_url(state_dir: Path) -> str | None:
    """The embedded redis-server's URL if it runs and answers, else None; starts nothing."""
    return _live_url(embedded_dir(state_dir) / "url")


def redis_url(settings) -> str:
    """The configured Redis URL, or the embedded server's."""
    return settings.redis_url or ensure_embedded_redis(settings.state_dir)
