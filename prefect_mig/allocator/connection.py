"""The one way prefect-mig's long-running commands connect to Redis.

With ``PREFECT_MIG_REDIS_URL`` set it is that server (``rediss://`` with the TLS files the settings
name), or the primary that Redis Sentinel names (``redis+sentinel://``, or ``rediss+sentinel://``
for TLS to the Sentinels and to the primary; see `client_for_url`), found again after a failover. Without it, it is the embedded server, followed wherever it listens: each connection
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

import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.sentinel
from redis.connection import parse_url

from prefect_mig.allocator.embedded import embedded_dir, ensure_embedded_redis
from prefect_mig.errors import ConfigError

#: The URL form of a Redis watched by Sentinel: the sentinels' addresses, then the primary's name;
#: ``rediss+sentinel`` speaks TLS to both; the query names the Sentinels' own credentials.
SENTINEL_URL_FORM = (
    "redis[s]+sentinel://[user:password@]host:port[,host:port...]/service-name[/db]"
    "[?sentinel_username=NAME&sentinel_password=PASSWORD]"
)
_SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


#: The rights prefect-mig needs on a shared Redis (append ``>password``): its keys only, the commands
#: its scripts and reads use, nothing dangerous (no FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN). INFO
#: (read-only, though filed under @dangerous) lets the scripts see the server's run_id change when
#: Redis restarts or fails over and may have lost the last grants.
MINIMAL_ACL = (
    "on ~pmig:* resetchannels -@all +@read +@write +@scripting +@connection +@transaction +blpop +time -@dangerous"
    " +info"
)


def redacted(url: str) -> str:
    """`url` with its passwords (the user's, a Sentinel URL's ``sentinel_password``) replaced by
    ``***``, for printing.

    Examples:
        ```python
        from prefect_mig.allocator.connection import redacted

        assert redacted("redis://prefect-mig:s3cret@127.0.0.1:6379/0") == "redis://prefect-mig:***@127.0.0.1:6379/0"
        assert redacted("redis+sentinel://h:1/pmig?sentinel_password=s3cret") == "redis+sentinel://h:1/pmig?sentinel_password=***"
        assert redacted("redis//:s3cret@h:1/0") == "redis//:***@h:1/0"  # a mistyped scheme too
        ```
    """
    url = re.sub(r"([?&]sentinel_password=)[^&#]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL as written: mask what stands between the last '/' and the '@'
        creds, at, host = url.rpartition("@")
        if not at:
            return url
        head, slash, user = creds.rpartition("/")
        return f"{head}{slash}{user.partition(':')[0]}:***@{host}"
    creds, at, host = rest.rpartition("@")
    if not at:
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


def _refused(url: str, why: str) -> ConfigError:
    return ConfigError(
        f"redis_url={redacted(url)!r}: {why}; a Sentinel URL is {SENTINEL_URL_FORM} "
        "(e.g. redis+sentinel://pmig:PASSWORD@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/pmig).",
        field="redis_url",
        value=redacted(url),
    )


def _sentinel_client(url: str, **options: Any) -> redis.Redis:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise _refused(url, "the path must be /service-name or /service-name/db")
    hosts = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise _refused(url, f"sentinel address {address!r} needs a port (1-65535) after the host")
        hosts.append((host.strip("[]") or "localhost", int(port)))
    if len(path) > 1 and not path[1].isdigit():
        raise _refused(url, f"the database {path[1]!r} must be a number")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_SENTINEL_QUERY))
    if unknown:
        raise _refused(url, f"unknown query parameter {unknown[0]!r} (allowed: {', '.join(_SENTINEL_QUERY)})")
    tls = url.startswith("rediss+")
    if not tls and any(k.startswith("ssl_") for k in options):
        raise ConfigError(
            f"redis_url={redacted(url)!r}: TLS files are set, but redis+sentinel:// does not use TLS; "
            "write rediss+sentinel:// to speak TLS to the Sentinels and the primary, or unset the TLS files.",
            field="redis_url", value=redacted(url),
        )
    if tls:
        options = {**options, "ssl": True}
    # the Sentinels: the same timeouts and TLS files as the data nodes, their own credentials
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
    for key in _SENTINEL_QUERY:
        own = query.get(key) or options.pop(key, None)
        if own:
            sentinel_kwargs[key.removeprefix("sentinel_")] = own
    options = {k: v for k, v in options.items() if k not in _SENTINEL_QUERY}
    sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    credentials = {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
    return sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0, **credentials, **options)


def client_for_url(url: str, **options: Any) -> redis.Redis:
    """A client for a Redis URL: ``redis://``, ``rediss://``, ``unix://`` (redis-py's own parsing),
    or ``redis+sentinel://`` / ``rediss+sentinel://`` (`SENTINEL_URL_FORM`): the sentinels are
    asked for the primary on every new connection, so after a failover the client reconnects to the
    promoted replica. The URL's user and password are the data nodes'; the Sentinels' own come from
    the query or from the ``sentinel_username`` / ``sentinel_password`` options (the URL's win).
    With ``rediss+sentinel://`` the ``ssl_*`` options (CA, client certificate and key) serve both.

    Examples:
        ```python
        from prefect_mig.allocator.connection import client_for_url

        client = client_for_url("redis+sentinel://pmig:pw@127.0.0.1:26379,127.0.0.1:26380/pmig/0")
        assert client.connection_pool.service_name == "pmig"
        ```
    """
    if url.startswith(_SENTINEL_SCHEMES):
        return _sentinel_client(url, **options)
    try:
        return redis.Redis.from_url(url, **{k: v for k, v in options.items() if k not in _SENTINEL_QUERY})
    except ValueError as exc:  # redis-py's parse: a port that is no number, an unknown query option
        raise ConfigError(
            f"redis_url={redacted(url)!r}: {exc}; a Redis URL is redis://[[user]:password@]host[:port][/db] "
            "(rediss:// with TLS) or unix://[[user]:password@]/path/to/socket[?db=N].",
            field="redis_url", value=redacted(url),
        ) from exc


def url_options(settings, url: str | None = None) -> dict[str, Any]:
    """What `client_for_url` needs from the settings besides `url` (default: the settings' own):
    the TLS files (with ``rediss://`` and Sentinel URLs) and the Sentinels' credentials."""
    options: dict[str, Any] = {}
    url = url or settings.redis_url or ""
    if url.startswith(("rediss://", *_SENTINEL_SCHEMES)):  # a plain Sentinel URL refuses them
        files = {
            "ssl_ca_certs": settings.redis_tls_ca_file,
            "ssl_certfile": settings.redis_tls_cert_file,
            "ssl_keyfile": settings.redis_tls_key_file,
        }
        options.update({k: str(v) for k, v in files.items() if v is not None})
    if url.startswith(_SENTINEL_SCHEMES):
        if settings.redis_sentinel_username:
            options["sentinel_username"] = settings.redis_sentinel_username
        if settings.redis_sentinel_password is not None:
            options["sentinel_password"] = settings.redis_sentinel_password.get_secret_value()
    return options


def connect(settings, *, socket_connect_timeout: float = 2.0, socket_timeout: float = 10.0) -> redis.Redis:
    """A client to the configured Redis (TLS files from the settings), or to the embedded one."""
    timeouts = {"socket_connect_timeout": socket_connect_timeout, "socket_timeout": socket_timeout}
    if settings.redis_url is None:
        return redis.Redis(connection_pool=FollowingPool(settings.state_dir, **timeouts))
    return client_for_url(settings.redis_url, **timeouts, **url_options(settings))
