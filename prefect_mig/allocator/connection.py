"""The one way prefect-mig's long-running commands connect to Redis.

With ``PREFECT_MIG_REDIS_URL`` set it is that server (``rediss://`` with the TLS files the settings
name), or the primary that Redis Sentinel names (``redis+sentinel://``, see `client_for_url`), found
again after a failover. Without it, it is the embedded server, followed wherever it listens: each connection
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
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from redis.connection import parse_url

from prefect_mig.allocator.embedded import embedded_dir, ensure_embedded_redis
from prefect_mig.errors import ConfigError

#: The URL form of a Redis watched by Sentinel: the sentinels' addresses, then the primary's name.
SENTINEL_URL_FORM = "redis+sentinel://[user:password@]host:port[,host:port...]/service-name[/db]"


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


def _sentinel_client(url: str, **options: Any) -> redis.Redis:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    try:
        hosts = []
        for address in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = address.rpartition(":")
            hosts.append((host.strip("[]") or "localhost", int(port)))
        db = int(path[1]) if len(path) > 1 else 0
        if not path or len(path) > 2 or not hosts:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"redis_url={redacted(url)!r}: a Sentinel URL is {SENTINEL_URL_FORM} "
            "(e.g. redis+sentinel://pmig:PASSWORD@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/pmig).",
            field="redis_url",
            value=redacted(url),
        ) from None
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=timeouts)
    credentials = {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
    return sentinel.master_for(path[0], db=db, **credentials, **options)


def client_for_url(url: str, **options: Any) -> redis.Redis:
    """A client for a Redis URL: ``redis://``, ``rediss://``, ``unix://`` (redis-py's own parsing),
    or ``redis+sentinel://`` (`SENTINEL_URL_FORM`): the sentinels are asked for the primary on every
    new connection, so after a failover the client reconnects to the promoted replica. The user and
    password are the data nodes'; the sentinels are asked without them.

    Examples:
        ```python
        from prefect_mig.allocator.connection import client_for_url

        client = client_for_url("redis+sentinel://pmig:pw@127.0.0.1:26379,127.0.0.1:26380/pmig/0")
        assert client.connection_pool.service_name == "pmig"
        ```
    """
    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, **options)
    return redis.Redis.from_url(url, **options)


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
    return client_for_url(settings.redis_url, **timeouts, **tls)
