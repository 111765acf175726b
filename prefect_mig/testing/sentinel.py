"""A replicated Redis for tests: a primary, one or more replicas and three Sentinels, all private
processes, optionally over TLS and with passwords (the data nodes' and the Sentinels' own).

Every process listens on a free port of 127.0.0.1 and keeps its files in its own temporary
directory; `ReplicatedRedis.stop` ends them all. Sentinel runs as ``redis-server <conf> --sentinel``
(the same binary: no separate ``redis-sentinel`` package is needed).

Examples:
    ```python
    from prefect_mig.allocator.connection import client_for_url
    from prefect_mig.testing.sentinel import ReplicatedRedis

    with ReplicatedRedis(service="doc") as cluster:
        client = client_for_url(cluster.url)
        client.set("k", "v")
        assert client.wait(1, 5000) == 1  # the replica has it
        assert cluster.primary_port() == cluster.primary.port
    ```
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis

from prefect_mig.testing.redis_server import RedisServer, RedisServerError, RedisServerNotInstalled, _free_port

__all__ = ["ReplicatedRedis"]

_HOST = "127.0.0.1"


class ReplicatedRedis:
    """A primary and `replicas` replicas watched by three Sentinels (quorum 2).

    Args:
        service: the name Sentinel knows the primary by (the URL's service name).
        replicas: how many replicas start with the primary. With ``PREFECT_MIG_REDIS_REPLICAS=N``,
            grants go on after a failover only if at least N replicas remain: start N+1.
        down_after_ms: how long the primary must not answer before a Sentinel calls it down.
        failover_timeout_ms: Sentinel's ``failover-timeout``.
        startup_timeout: seconds to wait for the Sentinels to see the primary and its replicas.
        tls: certificate files (`prefect_mig.testing.tls.make_certs`): every process, Sentinels
            included, speaks TLS only and asks for a client certificate; `url` is ``rediss+sentinel://``.
        password: the data nodes' password (in `url`; the Sentinels use it to reach them).
        sentinel_password: the Sentinels' own password (``requirepass``; in `url` as
            ``?sentinel_password=``); they give it to each other too.

    Attributes:
        primary: the `RedisServer` started as the primary.
        replicas: the `RedisServer` replicas (after a failover one of them is the primary, as
            `primary_port` says).
    """

    def __init__(
        self,
        *,
        service: str = "pmig",
        replicas: int = 1,
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 10_000,
        startup_timeout: float = 60.0,
        tls: Mapping[str, Any] | None = None,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.service = service
        self.replica_count = replicas
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.startup_timeout = startup_timeout
        self.tls = dict(tls) if tls is not None else None
        self.password = password
        self.sentinel_password = sentinel_password
        self.primary = RedisServer(tls=self.tls, password=password)
        self.replicas: list[RedisServer] = []
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._dir: Path | None = None

    @property
    def replica(self) -> RedisServer | None:
        """The first replica."""
        return self.replicas[0] if self.replicas else None

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` (``rediss+sentinel://`` with `tls`) URL of the replicated
        Redis, database 0, with both passwords."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"{_HOST}:{port}" for port in self.sentinel_ports)
        query = f"?sentinel_password={quote(self.sentinel_password, safe='')}" if self.sentinel_password else ""
        return f"{scheme}://{auth}{hosts}/{self.service}/0{query}"

    def sentinel(self, index: int = 0, **options: Any) -> redis.Redis:
        """A client of Sentinel `index` (its password and TLS files unless `options` say otherwise)."""
        options = {**self._tls_options(), "password": self.sentinel_password, **options}
        return redis.Redis(host=_HOST, port=self.sentinel_ports[index], socket_timeout=5, decode_responses=True, **options)

    def primary_port(self) -> int | None:
        """The port of the primary the Sentinels agree on now (None: they do not answer)."""
        for index in range(len(self.sentinel_ports)):
            try:
                _, port = self.sentinel(index).sentinel_get_master_addr_by_name(self.service)
                return int(port)
            except (redis.ConnectionError, redis.TimeoutError, TypeError):
                continue
        return None

    def replicas_seen(self) -> int:
        """How many replicas the primary reports connected and in sync."""
        port = self.primary_port()
        if port is None:
            return 0
        try:
            info = self.primary.client(port=port, socket_timeout=2).info("replication")
        except (redis.ConnectionError, redis.TimeoutError):
            return 0
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")

    def start(self) -> ReplicatedRedis:
        if shutil.which("redis-server") is None:
            raise RedisServerNotInstalled("redis-server")
        self._dir = Path(tempfile.mkdtemp(prefix="prefect-mig-sentinel-"))
        try:
            self.primary.start()
            for _ in range(self.replica_count):
                replica = RedisServer(tls=self.tls, password=self.password, extra_args=["--replicaof", _HOST, str(self.primary.port)])
                self.replicas.append(replica)
                replica.start()
            for index in range(3):
                self._start_sentinel(index)
            self._wait(
                lambda: self.replicas_seen() >= self.replica_count and self._sentinels_see_replicas(),
                "the replicas in sync, seen by every Sentinel",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._sentinels = []
        for server in (self.primary, *self.replicas):
            server.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def wait_for_failover(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Wait until the Sentinels name a primary other than `old_port`; returns its port."""
        self._wait(lambda: self.primary_port() not in (None, old_port), "a failover", timeout_s)
        return int(self.primary_port())  # type: ignore[arg-type]

    def __enter__(self) -> ReplicatedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _start_sentinel(self, index: int) -> None:
        assert self._dir is not None
        port = _free_port()
        conf = self._dir / f"sentinel-{index}.conf"  # Sentinel rewrites it: it must be writable
        lines = [f"bind {_HOST}", f"dir {self._dir}"]
        if self.tls:  # TLS only, to clients, to the data nodes and to the other Sentinels
            lines += [
                "port 0", f"tls-port {port}", "tls-replication yes", "tls-auth-clients yes",
                f"tls-cert-file {self.tls['server.pem']}", f"tls-key-file {self.tls['server.key']}",
                f"tls-ca-cert-file {self.tls['ca.pem']}",
            ]  # fmt: skip
        else:
            lines.append(f"port {port}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        lines += [
            f"sentinel monitor {self.service} {_HOST} {self.primary.port} 2",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        log = open(self._dir / f"sentinel-{index}.log", "ab")
        process = subprocess.Popen(
            [shutil.which("redis-server"), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self._sentinels.append(process)
        self.sentinel_ports.append(port)

    def _tls_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.primary.client_options.items() if k != "password"}

    def _sentinels_see_replicas(self) -> bool:
        for index in range(len(self.sentinel_ports)):
            try:
                if len(self.sentinel(index).sentinel_slaves(self.service)) < self.replica_count:
                    return False
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                return False
        return True

    def _wait(self, predicate, what: str, timeout_s: float | None = None) -> None:  # noqa: ANN001
        deadline = time.monotonic() + (timeout_s or self.startup_timeout)
        while not predicate():
            dead = [p.args for p in self._sentinels if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RedisServerError(
                    f"waited {timeout_s or self.startup_timeout:g} s for {what}"
                    + (f"; a Sentinel exited: {dead[0]}" if dead else "")
                    + (f" (logs in {self._dir})" if self._dir else "")
                )
            time.sleep(0.1)
