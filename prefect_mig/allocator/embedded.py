"""The embedded default: a private redis-server under the state dir when no Redis URL is set.

It runs daemonized (AOF on, bound to 127.0.0.1) so leases taken by one ``prefect-mig`` command are
still there for the next; ``prefect-mig redis stop`` stops it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from prefect_mig.errors import ConfigError, RedisUnavailable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def embedded_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "redis"


def ensure_embedded_redis(state_dir: Path) -> str:
    """The URL of the embedded redis-server, started if it is not running.

    Raises:
        ConfigError: ``redis-server`` is not installed (says what to install, or to set a URL).
        RedisUnavailable: it did not come up (the message points at its log).
    """
    home = embedded_dir(state_dir)
    url_file = home / "url"
    if url_file.exists() and _answers(url_file.read_text().strip()):
        return url_file.read_text().strip()
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "PREFECT_MIG_REDIS_URL is not set and redis-server is not installed for the embedded "
            "default: install it (apt-get install redis-server) or set PREFECT_MIG_REDIS_URL.",
            field="redis_url",
        )
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    subprocess.run(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(home),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(home / "redis.pid"),
            "--logfile", str(home / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _answers(url):
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"the embedded redis-server did not start; see {home / 'redis.log'}.")
        time.sleep(0.05)
    url_file.write_text(url)
    return url


def stop_embedded_redis(state_dir: Path) -> bool:
    """Stop the embedded server (after an AOF rewrite); False if none was running."""
    url_file = embedded_dir(state_dir) / "url"
    if not url_file.exists() or not _answers(url_file.read_text().strip()):
        return False
    try:
        redis.Redis.from_url(url_file.read_text().strip()).shutdown(save=False)
    except redis.ConnectionError:
        pass
    url_file.unlink(missing_ok=True)
    return True


def redis_url(settings) -> str:
    """The configured Redis URL, or the embedded server's."""
    return settings.redis_url or ensure_embedded_redis(settings.state_dir)
