"""A node agent's claim on its node and GPUs: one agent per node and per GPU (see `NodeClaim`).

Two agents for one node (`prefect-mig agent` beside `up`'s, two hosts given one
``PREFECT_MIG_NODE``) would apply the same GPU's layout changes at once, destroying slices leased
meanwhile. So an agent claims its node and GPUs in Redis for its heartbeat TTL
(`Allocator.claim_node`) and keeps the claim renewed from a small thread while it serves, however
long one of its rounds takes (a carve on real NVML can take tens of seconds); a renewal only extends
a claim Redis still holds as this agent's (`Allocator.renew_node_claim`). Before each change it
makes (a carve step, a release, a publish) it checks the claim (`NodeClaim.check`): one that
another agent took, or that nobody could confirm for a whole TTL, stops it. On a clean exit the
claim is given back, if it is still its own, so an agent started on another host need not wait
for it to lapse; after a crash it lapses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from uuid import uuid4

log = logging.getLogger("prefect_mig.agent")

#: how long a clean exit keeps trying to give the claim back while Redis does not answer
GIVE_BACK_S = 5.0


class NodeClaim:
    """One agent's claim on `node` and the GPUs `gpus()` lists, for `ttl_s` at a time.

    Args:
        allocator: the cluster's allocator.
        node: the node's name.
        ttl_s: each claim or renewal holds this long (the agent's heartbeat TTL).
        gpus: the UUIDs of the node's GPUs, read at each claim.

    Examples:
        ```python
        from prefect_mig.allocator import Allocator
        from prefect_mig.errors import NodeTaken
        from prefect_mig.node_claim import NodeClaim
        from prefect_mig.testing.redis_server import RedisServer

        with RedisServer() as server:
            alloc = Allocator(server.client(), "doc")
            mine = NodeClaim(alloc, "node-a", ttl_s=30, gpus=lambda: ["GPU-1"])
            other = NodeClaim(alloc, "node-b", ttl_s=30, gpus=lambda: ["GPU-1"])
            other.identity["host"] = "elsewhere"
            with mine.kept():  # renewed from a thread until the block ends, then given back
                mine.check()
                try:
                    other.take()
                except NodeTaken as taken:
                    assert taken.what == "GPU GPU-1"
            other.take()  # given back on the clean exit: free at once
        ```
    """

    def __init__(self, allocator, node: str, *, ttl_s: float, gpus: Callable[[], Sequence[str]] = list) -> None:
        self.allocator = allocator
        self.node = node
        self.ttl_s = ttl_s
        self.gpus = gpus
        # who this agent is in its claim; read at each claim (tests change host and pid)
        self.identity = {"id": uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._confirmed_at: float | None = None  # when the last claim that held was sent (monotonic)
        self._lost: Exception | None = None  # NodeTaken: another agent holds it now
        self._keeping = 0
        self._lock = threading.Lock()
        # a claim sent whose outcome is not recorded yet: a stop that lands meanwhile (a signal
        # handler's SystemExit) may leave it won, so `kept` gives it back
        self._sending = False

    def _me(self) -> str:
        return json.dumps({**self.identity, "node": self.node}, sort_keys=True)

    def take(self) -> None:
        """Claim the node and its GPUs, or renew the claim, for `ttl_s`. The claim of an agent that
        died on this host (its pid is gone) is taken over at once; another host's lapses after its
        TTL.

        Raises:
            NodeTaken: another agent holds the node or one of its GPUs and may be alive (names
                what, its node, host and pid).
        """
        from prefect_mig.errors import NodeTaken

        me, gpus, sent = self._me(), list(self.gpus()), time.monotonic()
        self._sending = True
        try:
            taken = self.allocator.claim_node(self.node, me, ttl_s=self.ttl_s, gpus=gpus)
            if taken is not None:
                holder = _identity(taken[1])
                if holder["host"] == self.identity["host"] and not _pid_alive(holder["pid"]):
                    log.warning("node %s: taking over from agent pid %s on this host, which is gone", self.node,
                                holder["pid"])
                    taken = self.allocator.claim_node(self.node, me, ttl_s=self.ttl_s, gpus=gpus, replace=taken[1])
        except Exception:
            self._sending = False  # not won (Redis did not answer: a claim it applied lapses)
            raise
        if taken is None:
            with self._lock:
                self._confirmed_at, self._lost = sent, None
            self._sending = False
            return
        self._sending = False
        holder = _identity(taken[1])
        error = NodeTaken(node=self.node, namespace=self.allocator.keys.namespace, what=taken[0],
                          serving=holder["node"], host=holder["host"], pid=holder["pid"], ttl_s=self.ttl_s)
        with self._lock:
            if self._confirmed_at is not None:
                self._lost = error
        raise error

    def renew(self) -> bool:
        """Extend the claim for `ttl_s` while Redis still holds it as this agent's; False, changing
        nothing, when nobody holds the node (the claim lapsed, or was given back: a renewal that
        lands after `release` must not take the node again, see `Allocator.renew_node_claim`).
        `take` claims it again.

        Raises:
            NodeTaken: another agent holds the node or one of its GPUs now.
        """
        from prefect_mig.errors import NodeTaken

        me, gpus, sent = self._me(), list(self.gpus()), time.monotonic()
        refused = self.allocator.renew_node_claim(self.node, me, ttl_s=self.ttl_s, gpus=gpus)
        if refused is None:
            with self._lock:
                self._confirmed_at, self._lost = sent, None
            return True
        if refused[1] is None:
            return False
        holder = _identity(refused[1])
        error = NodeTaken(node=self.node, namespace=self.allocator.keys.namespace, what=refused[0],
                          serving=holder["node"], host=holder["host"], pid=holder["pid"], ttl_s=self.ttl_s)
        with self._lock:
            self._lost = error
        raise error

    def check(self) -> None:
        """Before a change on the node: raise unless the claim is this agent's (a no-op for an agent
        that never claimed, such as the simulator's).

        Raises:
            NodeTaken: a renewal found that another agent holds the node now.
            NodeClaimLapsed: no claim or renewal went through for a whole TTL (Redis did not
                answer, or the process was frozen): another agent may hold it now.
        """
        from prefect_mig.errors import NodeClaimLapsed

        with self._lock:
            confirmed, lost = self._confirmed_at, self._lost
        if lost is not None:
            raise lost
        if confirmed is not None and time.monotonic() - confirmed >= self.ttl_s:
            raise NodeClaimLapsed(node=self.node, age_s=time.monotonic() - confirmed, ttl_s=self.ttl_s)

    def held_as(self) -> str | None:
        """This agent's claim as Redis holds it, for a write that must land only while the claim is
        its own (`Allocator.publish`'s `agent`); None for an agent that does not hold a claim."""
        with self._lock:
            return self._me() if self._confirmed_at is not None else None

    def release(self) -> bool:
        """Give the claim back now, the node's and each GPU's that is still this agent's (another
        agent's is left alone). True if it released any."""
        with self._lock:
            self._confirmed_at = None
        return self.allocator.release_node_claim(self.node, self._me(), gpus=list(self.gpus()))

    @contextmanager
    def kept(self, *, first: Callable[[], None] | None = None) -> Iterator[NodeClaim]:
        """Take the claim (`take`, which may raise `NodeTaken`, or `first`, which takes it) and renew it every third of its
        TTL from a daemon thread until the block ends (`renew`: a claim that lapsed meanwhile is
        claimed again only by a `take`, the agent's next round, so a renewal landing after the
        give-back cannot hold the node for one more TTL); a renewal that finds another agent holding
        it makes the next `check` raise. On a clean exit (no exception, ``SystemExit(0)``: a stop
        signal, or `AgentStopped`: the agent stopped from another thread) the claim is given back,
        also when the stop lands while or just after the claim is taken, before the block begins
        (then any exception gives it back: nothing was done under it yet); after any other
        exception it lapses by itself. A claim another agent holds is never given back (`release`
        frees only this agent's). Nested blocks share the outer one's thread."""
        from prefect_mig.errors import AgentStopped, NodeTaken

        if self._keeping:
            self._keeping += 1
            try:
                yield self
            finally:
                self._keeping -= 1
            return
        self._keeping = 1
        done, thread = threading.Event(), None
        clean = began = refused = False
        try:  # from before the claim: a stop signal may land as soon as it is won
            (first or self.take)()
            thread = threading.Thread(target=self._renew_until, args=(done,), name=f"claim:{self.node}", daemon=True)
            thread.start()
            began = True
            yield self
            clean = True
        except SystemExit as exc:
            clean = exc.code in (0, None)
            raise
        except AgentStopped:
            clean = True
            raise
        except NodeTaken:
            refused = True
            raise
        finally:
            self._keeping = 0
            done.set()
            if thread is not None:
                thread.join(timeout=max(1.0, self.ttl_s))
            if (clean or not began and not refused) and (self._sending or self.held_as() is not None):
                self._release_quietly()

    def _release_quietly(self) -> None:
        """`release`, tried again while Redis fails it (BUSY running a long script, READONLY or
        unreachable past the client's own retries of a timeout), for at most `GIVE_BACK_S` and never
        past the moment the claim lapses by itself. Each try is a compare-and-delete, so one that
        lands late, or after another agent took the node, frees nothing that is not this agent's."""
        with self._lock:
            confirmed = self._confirmed_at
        lapses = (confirmed + self.ttl_s) if confirmed is not None else time.monotonic()
        give_up = min(time.monotonic() + GIVE_BACK_S, lapses)
        pause = 0.1
        while True:
            try:
                if self.release():
                    log.info("node %s: claim given back", self.node)
                return
            except Exception as exc:  # noqa: BLE001 - Redis down at exit: the claim lapses after its TTL
                if time.monotonic() + pause >= give_up:
                    log.warning("node %s: could not give the claim back (%s); it lapses after %g s", self.node, exc,
                                self.ttl_s)
                    return
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _renew_until(self, done: threading.Event) -> None:
        from prefect_mig.errors import NodeTaken

        lapsed = False
        while not done.wait(self.ttl_s / 3):
            try:
                renewed = self.renew()
            except NodeTaken as exc:
                log.error("node %s: another agent holds it now (%s); this agent stops acting on it", self.node, exc)
                return
            except Exception as exc:  # noqa: BLE001 - Redis down: retried; `check` fails once a TTL passed
                log.warning("node %s: could not renew the agent's claim (%s); retrying", self.node, exc)
                continue
            if not renewed and not lapsed and not done.is_set():
                # only `take` (the agent's next round) claims it again: this thread's renewal may land
                # after the block ended and the claim was given back
                log.warning("node %s: the agent's claim lapsed before its renewal reached Redis; it changes nothing "
                            "there until it has claimed the node again", self.node)
            lapsed = not renewed


def _identity(raw: str) -> dict:
    """An agent's identity from its claim; an unreadable one names no host."""
    try:
        found = json.loads(raw)
        return {"host": str(found["host"]), "pid": int(found["pid"]), "node": str(found.get("node", "?"))}
    except (ValueError, TypeError, KeyError):
        return {"host": "?", "pid": 0, "node": "?"}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
