"""The allocator's Lua scripts: one per state transition, loaded once per Redis client.

Each ``lua/<name>.lua`` is prefixed with ``lua/_lib.lua`` (shared helpers: time, events, grant,
hand-off) and registered with redis-py's ``register_script``, which runs EVALSHA and reloads the
script on ``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``).

On a plain ``redis.Redis`` the call takes a fast path: the EVALSHA head (sha, key count and the
fixed keys) is packed into RESP bytes once, so a call packs only its own arguments, and each thread
keeps one connection of its own instead of checking one out of the pool per call. Measured on a
lease cycle, redis-py's generic packing and pool checkout each cost about as much as the script.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from functools import cache
from importlib import resources

import redis
from redis.exceptions import NoScriptError

from prefect_mig.allocator.keys import Keys

NAMES = (
    "acquire",
    "release",
    "renew",
    "reap",
    "cancel",
    "touch_wait",
    "publish",
    "heartbeat",
    "drain",
    "set_quota",
    "withdraw",
    "warm",
    "drain_node",
    "settle",
    "forget_node",
    "clear_desired",
)

#: KEYS order every script expects (see _lib.lua).
FIXED_KEYS = (
    "slices",
    "slice_state",
    "gpus",
    "draining",
    "nodes",
    "node_deadline",
    "pkeys",
    "leases",
    "fence",
    "seq",
    "requests",
    "waiting",
    "wait_deadline",
    "tenant_slices",
    "tenant_compute",
    "quotas",
    "events",
    "repartitioner",
    "withholding",
    "config",
    "epoch",
    "quarantine",
    "counters",
    "drained_nodes",
    "awaiting_fence",
    "announce",
    "run_id",
    "desired",
)


@cache
def source(name: str) -> str:
    lua = resources.files("prefect_mig.allocator").joinpath("lua")
    return lua.joinpath("_lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


class NotReplicated(redis.RedisError):
    """The script ran on the primary, but fewer replicas than asked acknowledged it in time (a
    failover now could lose it). `reply` is the script's reply."""

    def __init__(self, message: str, reply) -> None:
        super().__init__(message)
        self.reply = reply


class DeadlinePassed(redis.TimeoutError):
    """No reply came before the caller's deadline (the connection was dropped; the command may still
    run on the server)."""


def read_by(conn, deadline: float | None):
    """Read a reply on `conn`, waiting no later than `deadline` (monotonic) when one is given."""
    if deadline is not None and not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
        conn.disconnect()
        raise DeadlinePassed("no reply before the deadline")
    return conn.read_response()


class Scripts:
    """The registered scripts of one client and namespace; call ``scripts.run(name, *args)``."""

    def __init__(self, client, keys: Keys, *, events_maxlen: int = 100_000) -> None:
        self.keys = keys
        # encoded once: packing 19 keys per call is a visible share of a lease cycle
        self._key_list = [getattr(keys, name).encode() for name in FIXED_KEYS]
        self._prefix = keys.prefix.encode()
        self._events_maxlen = events_maxlen
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}
        self._client = client
        self._heads: dict[tuple, bytes] = {}
        self._local = threading.local()

    def run(
        self, name: str, *args, keys: Sequence[str] = (), now_ms: int | None = None, client=None,
        deadline: float | None = None, replicas: int = 0, replica_timeout_ms: int = 1000,
    ):
        """Run a script; `keys` follow the fixed ones in ``KEYS`` (the script's own: the node's claim,
        for the scripts an agent runs for its node). With `deadline` (monotonic) raise
        `DeadlinePassed` rather than wait longer for the reply (on a plain ``redis.Redis``; other
        clients keep their socket timeouts). With `replicas`, then wait (``WAIT``) until that many
        replicas have the script's writes, and raise `NotReplicated` when fewer did within
        `replica_timeout_ms` (plain ``redis.Redis`` only)."""
        argv = [self._prefix, b"" if now_ms is None else int(now_ms), self._events_maxlen, *args]
        if client is None and type(self._client) is redis.Redis:
            reply = self._run_packed(name, [*keys, *argv] if keys else argv, len(keys), deadline)
            if replicas:
                self._confirm(name, reply, replicas, replica_timeout_ms)
            return reply
        return self._scripts[name](keys=[*self._key_list, *keys], args=argv, client=client)

    def _confirm(self, name: str, reply, replicas: int, timeout_ms: int) -> None:
        # WAIT on the connection that ran the script: it counts the replicas that have this
        # connection's writes so far (and, the stream being ordered, everything written before them).
        conn = self._connection()
        try:
            conn.send_command("WAIT", replicas, timeout_ms)
            acked = int(conn.read_response())
        except BaseException:
            conn.disconnect()
            raise
        if acked < replicas:
            raise NotReplicated(
                f"{name}: {acked} of the {replicas} replica(s) asked for acknowledged it within {timeout_ms} ms",
                reply,
            )

    def _head(self, name: str, nargs: int, own_keys: int) -> bytes:
        """EVALSHA, the key count and the fixed keys; `nargs` values follow, the first `own_keys`
        of them the script's own keys."""
        script = self._scripts[name]
        head = self._heads.get((name, script.sha, nargs, own_keys))
        if head is None:
            nkeys = str(len(self._key_list) + own_keys).encode()
            parts = [b"EVALSHA", script.sha.encode(), nkeys, *self._key_list]
            total = len(parts) + nargs
            head = b"*%d\r\n" % total + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
            self._heads[(name, script.sha, nargs, own_keys)] = head
        return head

    def _connection(self, purpose: str = "conn"):
        """This thread's own connection for `purpose` (made like the pool's): the pool's checkout
        and release cost about as much as the command on a lease cycle's hot path. Waits block on a
        connection of their own (``"pop"``): one dropped at a wait's deadline leaves the scripts'
        connection up for the withdrawal that follows (no reconnect, TLS handshake included)."""
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.__dict__.clear()
            self._local.pid = os.getpid()
        conn = getattr(self._local, purpose, None)
        if conn is None:
            pool = self._client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            setattr(self._local, purpose, conn)
        if not conn.is_connected:
            # connect() as the pool would: a Sentinel-managed connection asks the Sentinels for the
            # primary there (sending on an unconnected one would go to its default address)
            conn.connect()
        return conn

    def _load_all(self, conn) -> None:
        """Load every script on `conn` at once (Redis is new or restarted, or flushed its scripts): a
        later first use of another script, such as a withdrawal under a short deadline, then costs
        no extra round trip."""
        for script in self._scripts.values():
            conn.send_command("SCRIPT", "LOAD", script.script)
        for script in self._scripts.values():
            sha = conn.read_response()
            script.sha = sha.decode() if isinstance(sha, bytes) else sha

    def _run_packed(self, name: str, argv: list, own_keys: int = 0, deadline: float | None = None):
        """Run `name`; the first `own_keys` of `argv` are the script's own keys, the rest ARGV."""
        encoded = [a if isinstance(a, bytes) else str(a).encode() for a in argv]
        body = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded)
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.send_packed_command([self._head(name, len(encoded), own_keys) + body])
                try:
                    return read_by(conn, deadline)
                except NoScriptError:
                    self._load_all(conn)
                    conn.send_packed_command([self._head(name, len(encoded), own_keys) + body])
                    return read_by(conn, deadline)
            except (redis.ResponseError, DeadlinePassed):
                raise  # a refusal, or a deadline (read_by dropped the connection; it reconnects)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # a half-read reply must not be read by the next call
                self._local.conn = None
                # A connection that went stale (Redis restarted) fails once; every script is
                # safe to run again (acquire recognises its own request id), so retry once.
                if attempt == 2:
                    raise
            except BaseException:
                conn.disconnect()
                self._local.conn = None
                raise
        raise AssertionError("unreachable")
