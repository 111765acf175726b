"""A private ``redis-server`` process for tests, benchmarks and the embedded default.

Each :class:`RedisServer` runs its own ``redis-server`` on a free port of 127.0.0.1 with its own
data directory and AOF persistence on, so tests never share state with a system Redis or with each
other, and persistence can be tested with :meth:`RedisServer.restart` and :meth:`RedisServer.kill`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import redis

from prefect_mig.errors import PrefectMigError

__all__ = ["RedisServer", "RedisServerError", "RedisServerNotInstalled"]

_HOST = "127.0.0.1"
_LOG_NAME = "redis-server.log"
_PORT_ATTEMPTS = 3
_STOP_TIMEOUT_S = 10.0


class RedisServerError(PrefectMigError):
    """A private ``redis-server`` did not start, answer or stop.

    Attributes:
        port: The port the server was to listen on, if one was chosen.
        log_tail: The last lines of the server's log, if it wrote any.
    """

    def __init__(self, message: str, *, port: int | None = None, log_tail: str = "") -> None:
        if log_tail:
            message = f"{message}\nLast lines of the redis-server log:\n{log_tail}"
        super().__init__(message)
        self.port = port
        self.log_tail = log_tail


class RedisServerNotInstalled(RedisServerError):
    """The ``redis-server`` binary is not on ``PATH``.

    Attributes:
        binary: The name or path that was looked up.
    """

    def __init__(self, binary: str) -> None:
        super().__init__(
            f"{binary!r} was not found on PATH. Install the Debian/Ubuntu package `redis-server` "
            "(`sudo apt-get install redis-server`, or `sudo bash .ci/install-system`)."
        )
        self.binary = binary


class RedisServer:
    """A ``redis-server`` process that this object starts, owns and stops.

    The server listens on 127.0.0.1 only, on ``port`` or on a free port, keeps its data in ``dir``
    or in a fresh private temporary directory (mode 0700, removed by :meth:`stop`), and runs with
    ``--appendonly yes --appendfsync everysec --save ''``: the AOF is the only persistence.

    Args:
        port: The TCP port to listen on. ``None`` picks a free one.
        dir: The data directory. ``None`` creates a temporary directory that :meth:`stop` removes;
            a given directory is created if needed and kept.
        binary: The ``redis-server`` executable, a name looked up on ``PATH`` or a path.
        startup_timeout: Seconds to wait for the server to answer ``PING``.
        extra_args: More command-line arguments for ``redis-server``, e.g. ``["--maxmemory", "64mb"]``.
        tls: Certificate files as `prefect_mig.testing.tls.make_certs` returns them: the server then
            speaks TLS only on its port, asks clients for a certificate the CA signed, replicates
            over TLS, and `client` and `url` use ``client.pem`` (``rediss://``).
        password: Clients must give it (``requirepass``); a replica gives it to its primary too.

    Raises:
        RedisServerNotInstalled: On start, when ``binary`` is not found.
        RedisServerError: On start, when the server exits or does not answer ``PING`` in time.

    Examples:
        Start a server, write a key, and read it back after a restart on the same port and dir:

        ```python
        from prefect_mig.testing.redis_server import RedisServer

        with RedisServer() as server:
            server.client().set("greeting", "hello")
            server.restart()  # graceful: the AOF is flushed, then replayed on start
            assert server.client().get("greeting") == b"hello"
        ```
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        dir: str | os.PathLike[str] | None = None,
        binary: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        tls: Mapping[str, os.PathLike[str] | str] | None = None,
        password: str | None = None,
    ) -> None:
        self.requested_port = port
        self.requested_dir = Path(dir) if dir is not None else None
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.tls = dict(tls) if tls is not None else None
        self.password = password
        # Runtime state, set by start().
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._dir: Path | None = None
        self._owns_dir = False

    # -- what callers read --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._require_started("port", self._port)

    @property
    def dir(self) -> Path:
        """The server's data directory (AOF files and ``redis-server.log``)."""
        return self._require_started("dir", self._dir)

    @property
    def url(self) -> str:
        """A ``redis://`` (``rediss://`` with `tls`) URL for database 0 of the server."""
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{_HOST}:{self.port}/0"

    @property
    def client_options(self) -> dict[str, Any]:
        """What a ``redis.Redis`` needs besides host and port: the password, the TLS files."""
        options: dict[str, Any] = {"password": self.password} if self.password else {}
        if self.tls:
            options.update(
                ssl=True, ssl_ca_certs=str(self.tls["ca.pem"]),
                ssl_certfile=str(self.tls["client.pem"]), ssl_keyfile=str(self.tls["client.key"]),
            )
        return options

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a new ``redis.Redis`` client for the server; ``kwargs`` go to ``redis.Redis``."""
        return redis.Redis(**{"host": _HOST, "port": self.port, **self.client_options, **kwargs})

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``; a running server is left alone.

        After :meth:`kill`, the server comes back on the same port with the same data dir.
        """
        if self.running:
            return self
        if self._port is not None:
            self.restart()
            return self
        executable = self._executable()
        if self.requested_dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="prefect-mig-redis-"))
            self._owns_dir = True
        else:
            self.requested_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self.requested_dir
        _live_servers.add(self)
        try:
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                try:
                    self._launch(executable, self.requested_port or _free_port())
                    return self
                except RedisServerError as exc:
                    # Another process may take the free port between our probe and redis' bind.
                    lost_race = "Address already in use" in exc.log_tail
                    if self.requested_port or not lost_race or attempt == _PORT_ATTEMPTS:
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut the server down (SIGTERM, so the AOF is flushed) and remove a temporary dir."""
        self._terminate(signal.SIGTERM)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._owns_dir = False
        self._port = None
        _live_servers.discard(self)

    def restart(self) -> None:
        """Stop the server gracefully and start it again on the same port with the same data dir.

        Works after :meth:`kill` too, which is how crash recovery from the AOF is tested.
        """
        port = self.port
        self._terminate(signal.SIGTERM)
        self._launch(self._executable(), port)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; the port and data dir are kept."""
        self._terminate(signal.SIGKILL)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        if self._port is None:
            return f"<RedisServer (not started) binary={self.binary!r}>"
        state = "running" if self.running else "stopped"
        return f"<RedisServer {state} url={self.url!r} dir={str(self._dir)!r}>"

    # -- internals ----------------------------------------------------------------------------------

    def _executable(self) -> str:
        executable = shutil.which(self.binary)
        if executable is None:
            raise RedisServerNotInstalled(self.binary)
        return executable

    def _require_started(self, name: str, value: Any) -> Any:
        if value is None:
            raise RedisServerError(f"RedisServer.{name} is only known after start(); call start() first.")
        return value

    def _launch(self, executable: str, port: int) -> None:
        assert self._dir is not None
        command = [
            executable,
            "--bind", _HOST,
            "--port", str(port),
            "--dir", str(self._dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            *self._secure_args(port),
            *self.extra_args,
        ]  # fmt: skip
        self._log = open(self._dir / _LOG_NAME, "ab")
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._port = port
        try:
            self._wait_until_answering()
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise

    def _secure_args(self, port: int) -> list[str]:
        args = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        if self.tls:
            args += [
                "--port", "0", "--tls-port", str(port), "--tls-replication", "yes", "--tls-auth-clients", "yes",
                "--tls-cert-file", str(self.tls["server.pem"]), "--tls-key-file", str(self.tls["server.key"]),
                "--tls-ca-cert-file", str(self.tls["ca.pem"]),
            ]  # fmt: skip
        return args

    def _wait_until_answering(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(
            host=_HOST, port=self._port, socket_connect_timeout=0.5, socket_timeout=0.5, **self.client_options
        )
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {code} while starting on port {self._port}.",
                        port=self._port,
                        log_tail=self._log_tail(),
                    )
                try:
                    if probe.ping():
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # not listening yet, or still loading the AOF
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on port {self._port} did not answer PING within "
                        f"{self.startup_timeout:g} s.",
                        port=self._port,
                        log_tail=self._log_tail(),
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    def _terminate(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        try:
            text = (self._dir / _LOG_NAME).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


# Started servers, stopped when the interpreter exits if nobody stopped them, so none is left behind.
_live_servers: set[RedisServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.stop()
