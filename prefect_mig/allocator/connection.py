"""The one way prefect-mig's long-running commands connect to Redis.

With ``PREFECT_MIG_REDIS_URL`` set it is that server (``rediss://`` with the TLS files the settings
name). Without it, it is the embedded server, followed wherever it listens: each connection
re-reads the URL file, so an ``api serve`` or ``agent`` keeps working after the embedded server was
restarted on another port (by ``prefect-mig up``, a task, or any command that needed it).

Examples:
    ```python
    import tempfile
    from prefect_mig.allocator.connection import connect
    from prefect_mig.allocator.embedded import stop_embedded_redis
    from prefect_mig.settings import Settings

    state = tempfile.mkdtemp()
    client = connect(Settings(state_dir=state))
    assert client.ping()
    stop_embedded_redis(state)
    ```
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import redis
from redis.connection import parse_url

from prefect_mig.allocator.embedded import embedded_dir, ensure_embedded_redis


#: The rights prefect-mig needs on a shared Redis (append ``>password``): its keys only, the commands
#: its scripts and reads use, nothing dangerous (no FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN).
MINIMAL_ACL = "on ~pmig:* resetchannels -@all +@read +@write +@scripting +@connection +@transaction +blpop +time -@dangerous"


def redacted(url: str) -> str:
    """`url` with its password replaced by ``***``, for printing.

    Examples:
        ```python
        from prefect_mig.allocator.connection import redacted

        assert redacted("redis://prefect-mig:s3cret@127.0.0.1:6379/0") == "redis://prefect-mig:***@127.0.0.1:6379/0"
        ```
    """
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = creds.partition(":")
    return f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"


class FollowingPool(redis.ConnectionPool):
    """A pool whose connections go to the embedded server's current URL (re-read per connection)."""

    def __init__(self, state_dir: Path, **kwargs: Any) -> None:
        self._state_dir = Path(state_dir)
        self._extra = kwargs
        self._url = ensure_embedded_redis(self._state_dir)
        self._follow_lock = threading.Lock()
        super().__init__(**{**parse_url(self._url), **kwargs})

    def _current_url(self) -> str:
        try:
            return (embedded_dir(self._state_dir) / "url").read_text().strip() or self._url
        except OSError:
            return self._url

    def get_connection(self, *args: Any, **kwargs: Any):  # noqa: ANN201
        url = self._current_url()
        if url != self._url:
            with self._follow_lock:
                if url != self._url:
                    self.disconnect()
                    self.connection_kwargs = {**parse_url(url), **self._extra}
                    self.reset()
                    self._url = url
        return super().get_connection(*args, **kwargs)


def connect(settings, *, socket_connect_timeout: float = 2.0, socket_timeout: float = 10.0) -> redis.Redis:
    """A client to the configured Redis (TLS files from the settings), or to the embedded one."""
    timeouts = {"socket_connect_timeout": socket_connect_timeout, "socket_timeout": socket_timeout}
    if settings.redis_url is None:
        return redis.Redis(connection_pool=FollowingPool(settings.state_dir, **timeouts))
    tls = {}
    if settings.redis_url.startswith("rediss://"):
        tls = {
            k: str(v)
            for k, v in {
                "ssl_ca_certs": settings.redis_tls_ca_file,
                "ssl_certfile": settings.redis_tls_cert_file,
                "ssl_keyfile": settings.redis_tls_key_file,
            }.items()
            if v is not None
        }
    return redis.Redis.from_url(settings.redis_url, **timeouts, **tls)
