"""The lease allocator: Python over one Lua script per transition, Redis as the only truth.

Policy, stated once:

- **Placement (best fit against fragmentation).** A request lists the slice kinds it accepts,
  smallest first; the first kind with a free slice wins. Among free slices of that kind, first fit
  over a fixed GPU order (each GPU's ordinal from its first publish), then lower start: leases pack
  onto the first GPUs, which are the ones already in use, and the last GPUs stay idle and whole for
  the planner to re-carve. Scores are static, so a grant never re-scores other slices.
- **Order.** Waiting requests are ordered by ``enqueue time - priority x aging``: strict priority
  between requests enqueued within ``aging`` of each other, FIFO within a priority, and a request
  that waited ``aging`` longer beats one a level higher, so no wait is endless.
- **No head-of-line blocking, backfill by kind.** There is one queue per slice kind. A freed slice
  goes to the best waiter that accepts its kind (and whose node constraint and quota allow it); a
  queued 3g request never holds back a free 1g. Big requests are protected from small ones by the
  order above: a small request that also accepts big slices only gets one ahead of a big request
  when it is better ordered. There is no reservation: aging bounds every wait.
- **Preemption.** A queued request may revoke the lowest-priority *preemptible* lease of strictly
  lower priority on a kind it accepts, if its quota would let it take that slice. The holder is told
  at once (a push its `Lease` watches) and its error says "revoked for a priority-N request". Its
  lease keeps its expiry until it acknowledges; then it has at most the cluster's grace
  (`configure_cluster`, floor 2 s) -- a revocation never lengthens a lease. The slice goes to the
  best waiter when the holder releases it or its lease truly expires. A request that leaves the
  queue before the holder acknowledged undoes the revocation.
- **No idle slice while an eligible request waits.** A freed slice looks past any number of
  waiters it cannot serve (quota, node); `reap` re-offers free slices to waiting requests.
- **Epochs.** A missing epoch key means Redis lost the cluster's state; the next script writes a new
  epoch and a ``cluster.epoch`` event. A node agent that published under the old epoch gets its
  idle slices quarantined until every holder from before has had to stop (`max_ttl_s`).
- **Dead holders.** A lease that expires on a node whose agent fences containers (it published
  with ``fence_settle_s``) leaves its slice quarantined until that agent confirms the holder's task
  container gone (`settle_fenced`), or at most ``fence_settle_s``: never two holders on one slice.
- **Restarts.** A Redis server with another run_id than the scripts last saw (a restart, a restore,
  a failover) may have lost the last grants: every slice not leased there, on a node whose agent
  fences containers, is quarantined the same way until that agent's next fencing pass.
- **Fencing.** Every grant takes the next value of one counter; renew and release must present it.

Examples:
    ```python
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), namespace="doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3"]})
        grant = alloc.try_acquire(SliceRequest(profile="1g.6gb"))
        assert grant.slice.profile == "1g.6gb" and grant.fence > 0
        assert alloc.release(grant.lease_id, grant.fence) is True
    ```
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from prefect_mig.allocator.inventory import Inventory
from prefect_mig.allocator.keys import Keys
from prefect_mig.allocator.layout_changes import LayoutChanges
from prefect_mig.allocator.models import LeaseInfo, Quota, SliceRecord, SliceRequest, decode
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.scripts import DeadlinePassed, NotReplicated, Scripts, read_by
from prefect_mig.errors import (
    AllocationError,
    ConfigError,
    InvalidRequirement,
    LeaseLost,
    LeaseNotOwned,
    NoCapacity,
    NodeNotClaimed,
    PrefectMigError,
    RedisUnavailable,
    Unsatisfiable,
    UnknownProfile,
    WaitTimeout,
)
from prefect_mig.model import catalog


def _candidate_pkeys(request: SliceRequest, models: tuple[str, ...]) -> list[str]:
    """`request.candidate_pkeys` on the published `models`. With none published yet (``("",)``:
    agents starting, or Redis lost its data) a request waits as the kinds of every catalog model
    that offers it, so whichever node publishes first serves it (as H100-80GB kinds alone, an A30
    node never did); one no model offers is refused naming the catalog, never judged against one
    model the cluster may not have."""
    if models != ("",):
        return request.candidate_pkeys(models)
    try:
        return request.candidate_pkeys(tuple(catalog().models))
    except (UnknownProfile, InvalidRequirement):
        return request.candidate_pkeys(())  # raises, naming the catalog rather than each model


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Queued:
    """A request that joined the wait queue."""

    def __init__(self, request_id: str, queue_length: int) -> None:
        self.request_id = request_id
        self.queue_length = queue_length

    def __repr__(self) -> str:
        return f"Queued({self.request_id!r}, queue_length={self.queue_length})"


def _seconds(s: float | None) -> str:
    """A timeout as people wrote it (``5``, ``1.25``), not what was left of it (``4.99933``)."""
    return "no limit" if s is None else f"{round(s, 2):g}"


def _grant_info(request: SliceRequest, lease_id: str, fence, expires, slice_json: str, waited=0) -> LeaseInfo:
    return LeaseInfo(
        lease_id=lease_id,
        fence=int(fence),
        slice=SliceRecord.model_validate_json(slice_json),
        expires_at_ms=int(expires),
        holder=request.holder,
        tenant=request.tenant,
        priority=request.priority,
        ttl_ms=int(request.ttl_s * 1000),
        waited_ms=int(waited),
    )




#: The shortest preemption grace a cluster may set: a revoked holder needs time to stop its container.
GRACE_FLOOR_S = 2.0
#: The grace of a cluster that never set one (as in _lib.lua).
DEFAULT_GRACE_MS = 10_000


#: the longest wait for a slice a caller may ask for (30 days): beyond it, socket timeouts overflow
MAX_WAIT_S = 30 * 86_400.0


def _seconds_in(value: object, low: float, high: float, *, field: str, what: str) -> float:
    """`value` as a finite number of seconds in [low, high], else a ConfigError saying `what`."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and low <= seconds <= high):
        raise ConfigError(f"{field}={value!r}: {what}", field=field, value=value)
    return seconds


def check_wait(timeout_s: float | None, *, field: str = "timeout_s") -> float | None:
    """A wait for a slice is None (as long as it takes) or a finite number of seconds from 0 (no
    wait) to `MAX_WAIT_S`, checked before anything is asked of Redis (so a refused one holds
    nothing).

    Raises:
        ConfigError: names `field`, the value and what is allowed.
    """
    if timeout_s is None:
        return None
    return _seconds_in(timeout_s, 0, MAX_WAIT_S, field=field, what=(
        f"a wait for a slice must be a finite number of seconds from 0 (no wait) to {MAX_WAIT_S:.0f} (30 days), "
        "or None (as long as it takes)."))


def check_ttl(ttl_s: float, max_ttl_s: float, *, field: str = "ttl_s") -> float:
    """A lease TTL must be a finite number of seconds in [1, max_ttl_s]."""
    return _seconds_in(ttl_s, 1, max_ttl_s, field=field, what=(
        f"a lease TTL must be a finite number of seconds from 1 to {max_ttl_s:g} "
        "(the cluster's maximum, PREFECT_MIG_LEASE_MAX_TTL_S)."))


class Allocator(Inventory, LayoutChanges):
    """Leases on MIG slices, kept in Redis. The inventory (what agents publish, heartbeats,
    fencing) is `prefect_mig.allocator.inventory.Inventory`'s; out-of-service slices and desired
    layouts are `prefect_mig.allocator.layout_changes.LayoutChanges`'; the leases are this class's.

    Args:
        client: a ``redis.Redis`` (decode_responses either way).
        namespace: the cluster's namespace; all its keys share the hash tag ``{namespace}``.
        clock: a virtual clock (`ManualClock`); default: Redis ``TIME``.
        aging_s: waiting this long is worth one priority level.
        wait_ttl_s: a waiting request nobody touches for this long is dropped (dead waiter); a
            waiter touches it every third of this, at most every 2 s (``PREFECT_MIG_WAIT_TTL_S``
            where the settings build the client). A hand-over to a waiter that died comes back
            after `claim_s`, not this.
        grace_s: ``None`` turns preemption off for this client's requests; any number turns it on.
            The grace itself is the cluster's (`configure_cluster`), not the requester's.
        claim_s: a lease handed to a waiting request lives this long until `wait_for_grant` claims
            it (so a grant to a waiter that died comes back quickly); ``None``: the whole TTL at
            once (for callers that do not wait with `wait_for_grant`, e.g. the simulator).
        max_ttl_s: the cluster's longest lease TTL: longer requests and renewals are refused, and
            after Redis lost its state, nodes that outlived it wait this long before granting.
        queue_uncarved: let requests wait for a kind of slice no GPU is carved into yet (when a
            repartitioner runs, it will carve it); otherwise such a request is `Unsatisfiable`.
        replicas: with a replicated Redis, a grant or renewal counts only once this many replicas
            have it (``WAIT``), so a failover cannot lose a lease its holder was told about; one
            that is not acknowledged within `replica_timeout_s` raises `RedisUnavailable` (a grant
            is then given back). 0: no wait (a single Redis).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "default",
        *,
        clock: Clock | None = None,
        aging_s: float = 60.0,
        wait_ttl_s: float = 15.0,
        grace_s: float | None = 10.0,
        events_maxlen: int = 100_000,
        queue_uncarved: bool = False,
        max_ttl_s: float = 900.0,
        claim_s: float | None = 1.0,
        replicas: int = 0,
        replica_timeout_s: float = 1.0,
    ) -> None:
        self.redis = client
        self.keys = Keys(namespace)
        self.clock = clock
        self.aging_ms = int(aging_s * 1000)
        self.wait_ttl_ms = int(wait_ttl_s * 1000)
        self.preempt = grace_s is not None
        self.max_ttl_s = float(max_ttl_s)
        self.claim_ms = None if claim_s is None else int(claim_s * 1000)
        self._epoch = ""  # the cluster epoch the last publish saw
        self.queue_uncarved = queue_uncarved
        self.scripts = Scripts(client, self.keys, events_maxlen=events_maxlen)
        self._models: tuple[float, list[str]] = (0.0, [])
        self._unknown_models: list[str] = []  # inventory models this process cannot look up (left out)
        self._templates: dict[tuple, str] = {}  # request JSON per (request, inventory models)
        self._cluster_id: str | None = None
        if replicas and type(client) is not redis.Redis:
            raise ConfigError(
                f"replicas={replicas}: waiting for replicas needs a plain redis.Redis client, not "
                f"{type(client).__name__}.", field="replicas", value=replicas,
            )
        self.replicas = int(replicas)
        self.replica_timeout_ms = max(1, int(replica_timeout_s * 1000))

    @property
    def namespace(self) -> str:
        """The cluster's namespace, as given (its keys are ``pmig:{namespace}:...``)."""
        return self.keys.namespace

    def _run(
        self, name: str, *args: Any, action: str, deadline: float | None = None, keys: Sequence[str] = ()
    ) -> list:
        now = self.clock.now_ms() if self.clock is not None else None
        # what a holder acts on (a grant, a claim, a renewal) must survive a failover
        replicas = self.replicas if name in ("acquire", "renew") else 0
        with redis_errors(action):
            reply = self.scripts.run(
                name, *args, keys=keys, now_ms=now, deadline=deadline, replicas=replicas,
                replica_timeout_ms=self.replica_timeout_ms,
            )
        return [decode(x) for x in reply] if isinstance(reply, list) else reply

    def _run_for_node(
        self, name: str, node: str | None, agent: str | None, *args: Any, action: str, keys: Sequence[str] = ()
    ) -> list:
        """Run a script a node agent runs for its `node`, its claim (`agent`, from `claim_node`)
        last in its arguments: Redis refuses it unless the node's claim is still that one (see
        ``claim_refusal`` in ``_lib.lua``), atomically with the write. `agent` None: unfenced (a
        caller that is no agent); `node` may then be None too. `keys`: the script's own keys of
        the node, passed after its claim's.

        Raises:
            NodeNotClaimed: the node's claim was no longer `agent` when the script ran.
        """
        if agent and not node:
            raise ConfigError(f"node: {node!r}; an agent's claim fences its writes for a named node: give the node's name",
                              field="node", value=node)
        keys = (self.keys.agent(node), *keys) if node else ()
        reply = self._run(name, *args, agent or "", action=action, keys=keys)
        if reply and reply[0] == "not_claimed":
            raise NodeNotClaimed(node=node, holder=reply[1] or None, action=action)
        return reply

    # ------------------------------------------------------------------ leases

    def _request_json(self, request: SliceRequest, request_id: str) -> str:
        models = tuple(m for m in self.gpu_models() if m not in self._unknown_models) or (request.gpu_model or "",)
        template = self._templates.get((request, models))
        if template is None:
            body = {
                "id": "@ID@",
                "pkeys": _candidate_pkeys(request, models),
                "node": request.node or "",
                "priority": request.priority,
                "tenant": request.tenant,
                "holder": request.holder,
                "ttl_ms": int(request.ttl_s * 1000),
                "preemptible": request.preemptible,
            }
            if self.claim_ms is not None:
                body["claim_ms"] = self.claim_ms
            template = json.dumps(body)
            if len(self._templates) > 1024:
                self._templates.clear()
            self._templates[(request, models)] = template
        return template.replace('"@ID@"', json.dumps(request_id), 1)

    def try_acquire(
        self, request: SliceRequest, *, wait: bool = False, request_id: str | None = None,
        deadline: float | None = None, wait_s: float | None = None,
    ) -> LeaseInfo | Queued:
        """Grant a slice now, or (with `wait`) join the queue and return `Queued`.

        `wait_s` is how long the caller will wait for a queued request: past it Redis drops the
        request instead of granting it, even if the caller's withdrawal never arrives (its process
        stopped, Redis did not answer in time). `deadline` (monotonic) bounds the wait for this
        call's reply.

        Raises:
            NoCapacity: nothing fits now and `wait` is false.
            Unsatisfiable: no GPU in the inventory offers a slice the request accepts; or the request
                is pinned to a `node` no agent ever published (field ``node``). A node that published
                and is now drained or lost (its heartbeat lapsed) counts as published: it may come
                back, so a request pinned to it waits. While no node at all is published (agents
                still starting) the pin is not judged.
        """
        check_ttl(request.ttl_s, self.max_ttl_s)
        request_id = request_id or uuid.uuid4().hex
        try:
            reply = self._run(
                "acquire",
            self._request_json(request, request_id),
            "1" if wait else "0",
                self.wait_ttl_ms,
                self.aging_ms,
                "1" if self.preempt else "",
                "1" if self.queue_uncarved else "0",
                "" if wait_s is None else max(1, int(wait_s * 1000)),
                action="acquire a slice",
                deadline=deadline,
            )
        except RedisUnavailable as exc:
            self._give_back_unconfirmed(exc)
            raise
        code = reply[0]
        if code == "granted":
            _, lease_id, fence, expires, _slice_id, slice_json = reply
            return _grant_info(request, lease_id, fence, expires, slice_json)
        if code == "queued":
            return Queued(reply[1], int(reply[2]))
        if code == "exists":  # our own call, retried after a dropped connection
            return self.lease(request_id) if reply[1] == "leased" else Queued(request_id, 0)
        if code == "no_capacity":
            why = {
                "quota": "the tenant's quota is used up",
                "uncarved": f"no GPU is carved for {request.requirement} yet (a request that waits is what a "
                            "repartitioner carves one for: give it a timeout)",
            }.get(reply[1], "every matching slice is leased")
            raise NoCapacity(f"no slice for {request.requirement} now: {why}.", reason=reply[1], lease_id=request_id)
        if code == "unknown_node":
            nodes = sorted(x for x in reply[1].split(",") if x)
            raise Unsatisfiable(
                f"node: no node named {request.node!r} has published an inventory to this cluster; published "
                f"nodes: {', '.join(nodes)}. Pin one of those (or leave node unset), or start `prefect-mig agent` "
                "on that host.",
                offered=[], field="node", value=request.node, lease_id=request_id,
            )
        if code == "unsatisfiable":
            offered = sorted(x for x in reply[1].split(",") if x)
            raise Unsatisfiable(
                f"no GPU in the inventory offers a slice for {request.requirement}"
                + (f" on {request.gpu_model}" if request.gpu_model else "")
                + f"; the inventory has: {', '.join(offered) or 'no slices at all (is an agent running?)'}.",
                offered=offered,
                lease_id=request_id,
            )
        raise AllocationError(f"unexpected reply from acquire: {reply!r}")

    def _give_back_unconfirmed(self, exc: RedisUnavailable) -> None:
        """A grant no replica acknowledged is not handed to its caller: give it back (best effort;
        if the primary is dying, the grant dies with it or expires unused)."""
        cause = exc.__cause__
        if isinstance(cause, NotReplicated) and cause.reply and decode(cause.reply[0]) == "granted":
            try:
                self.release(decode(cause.reply[1]), int(cause.reply[2]))
            except (RedisUnavailable, LeaseNotOwned):
                pass

    def wait_for_grant(
        self,
        request_id: str,
        timeout_s: float | None,
        *,
        stop: threading.Event | None = None,
        request: SliceRequest | None = None,
        asked_s: float | None = None,
        explain: bool = False,
    ) -> LeaseInfo:
        """Block (pushed, not polled) until the queued request is granted, or withdraw it.

        A `WaitTimeout` names `asked_s` (the caller's whole timeout, when `timeout_s` is what is
        left of it) and, with `explain`, why the request waited (`health.wait_reasons`).

        The grant is claimed (renewed to the full TTL) before it is returned: a grant that reaches a
        waiter too late to claim it went back, and the request queues again.

        Raises:
            WaitTimeout: `timeout_s` passed (honoured within about 100 ms whatever Redis does); the
                request left the queue (a grant that raced the timeout is released, so nothing is held).
            LeaseLost: the request was dropped (e.g. the reaper took it for a dead waiter).
            RedisUnavailable: Redis failed; the request is withdrawn as soon as Redis answers.

        `stop` (set from another thread, e.g. when an asyncio task is cancelled) ends the wait like
        a timeout, within one wake-up interval (at most 2 s).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            got = self._wait(request_id, deadline, stop, request)
        except DeadlinePassed:
            got = None
        except PrefectMigError:
            self.abandon(request_id)  # RedisUnavailable, LeaseLost: leave the queue once Redis answers
            raise
        except BaseException:
            self._withdraw(request_id)  # KeyboardInterrupt, SIGTERM: leave the queue before the process ends
            raise
        if got is not None:
            return got
        stopped = stop is not None and stop.is_set()
        why = self._why_waited(request_id) if explain and not stopped else ""
        try:
            self.give_up(request_id, deadline=time.monotonic() + 0.05)
        except (DeadlinePassed, RedisUnavailable):
            self.abandon(request_id)
        waited = "the wait was stopped" if stopped else f"no slice within {_seconds(asked_s or timeout_s)} s"
        raise WaitTimeout(f"{waited}; the request was withdrawn from the queue.{why}", lease_id=request_id)

    def _why_waited(self, request_id: str) -> str:
        """`` It waited because: ...`` for a WaitTimeout ('' when Redis cannot say)."""
        from prefect_mig.allocator.health import wait_reasons  # health reads through an Allocator

        try:
            reasons = wait_reasons(self, request_id)
        except PrefectMigError:
            return ""
        return f" It waited because: {'; '.join(reasons) or 'every matching slice is leased'}."

    def _wait(self, request_id, deadline, stop, request) -> LeaseInfo | None:
        """The wait itself: a LeaseInfo, or None when the deadline passed or `stop` was set."""
        waiter = self.keys.waiter(request_id)
        touch_every = max(0.05, min(2.0, self.wait_ttl_ms / 3000))
        began = time.monotonic()
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or (stop is not None and stop.is_set()):
                return None
            got = self._blpop(waiter, touch_every if left is None else min(touch_every, left), deadline)
            if got and stop is not None and stop.is_set():
                return None
            if not got and deadline is not None and time.monotonic() >= deadline:
                return None  # the wait is over: withdraw rather than keep the request alive
            if got:
                fence, expires, waited, slice_json = decode(got).split("|", 3)
                info = (
                    self.lease(request_id) if request is None
                    else _grant_info(request, request_id, fence, expires, slice_json, waited)
                )
                claimed = self._claim(info, request)
                if claimed is not None:
                    return claimed
                continue  # it went back before we could claim it: we are queued again
            state = self.keep_waiting(request_id, deadline=deadline)
            if state == "waiting":
                self._run("reap", 10, action="reap", deadline=deadline)  # progress where no agent reaps
            if state == "granted":
                claimed = self._claim(self.lease(request_id), request)
                if claimed is not None:
                    return claimed
                continue
            if state == "gone":
                raise LeaseLost(f"request {request_id} is no longer queued{self.why_gone(began)}", reason="gone",
                                lease_id=request_id)

    def why_gone(self, began: float) -> str:
        """Why a request queued since `began` (monotonic) is gone: Redis lost its data meanwhile (the
        cluster's epoch is younger than the wait), or it was dropped; the end of the sentence."""
        try:
            with redis_errors("read the cluster epoch"):
                epoch, (seconds, micros) = self.redis.pipeline(transaction=False).get(self.keys.epoch).time().execute()
        except PrefectMigError:
            epoch = None
        if epoch is not None:
            now_ms = self.clock.now_ms() if self.clock is not None else int(seconds) * 1000 + int(micros) // 1000
            age_s = (now_ms - int(epoch)) / 1000
            if age_s < time.monotonic() - began:
                return (f": Redis lost its data while it waited (the cluster's epoch began {age_s:.0f} s ago: a restart "
                        "without persistence, a FLUSHALL, or a failover to a replica without it), and the queue with it. "
                        "Ask again.")
        return " (dropped as abandoned?)."

    def keep_waiting(self, request_id: str, *, deadline: float | None = None) -> str:
        """Tell Redis a queued request's waiter is still there (it is dropped after `wait_ttl_s` of
        silence): ``waiting``, ``granted`` or ``gone``. `deadline` bounds the wait for the reply."""
        return self._run("touch_wait", request_id, self.wait_ttl_ms, action="keep waiting", deadline=deadline)[0]

    def keep_many_waiting(self, request_ids: Sequence[str]) -> dict[str, str]:
        """`keep_waiting` for many requests in one round trip (a server holding many waits touches
        them all at once instead of waking each): each id's ``waiting``, ``granted`` or ``gone``."""
        if not request_ids:
            return {}
        now = self.clock.now_ms() if self.clock is not None else None
        with redis_errors("keep requests waiting"):
            pipe = self.redis.pipeline(transaction=False)
            for request_id in request_ids:
                self.scripts.run("touch_wait", request_id, self.wait_ttl_ms, now_ms=now, client=pipe)
            replies = pipe.execute()
        return {rid: decode(reply[0]) for rid, reply in zip(request_ids, replies)}

    def claim(self, request_id: str, request: SliceRequest) -> LeaseInfo | None:
        """Claim the lease handed over to a queued request (for waiters other than
        `wait_for_grant`, such as the HTTP API's async wait): its full TTL, or None when it went
        back before the claim (the request is queued again)."""
        try:
            info = self.lease(request_id)
        except LeaseLost:
            again = self.try_acquire(request, wait=True, request_id=request_id)
            return again if isinstance(again, LeaseInfo) else None
        return self._claim(info, request)

    def _claim(self, info: LeaseInfo, request: SliceRequest | None) -> LeaseInfo | None:
        """Renew a handed-over lease to its full TTL; None (and queued again) if it already went back.

        Raises:
            LeaseLost: it went back and, without the request, cannot queue again."""
        try:
            expires = self.renew(info.lease_id, info.fence, info.ttl_ms / 1000)
        except (LeaseLost, LeaseNotOwned):
            if request is None:
                raise
            again = self.try_acquire(request, wait=True, request_id=info.lease_id)
            return again if isinstance(again, LeaseInfo) else None
        return info.model_copy(update={"expires_at_ms": expires})

    def _blpop(self, key: str, timeout_s: float, deadline: float | None):
        """BLPOP that returns (None) by `deadline` even when Redis does not answer at all."""
        if type(self.redis) is not redis.Redis:
            with redis_errors("wait for a slice"):
                got = self.redis.blpop([key], timeout=timeout_s)
            return got[1] if got else None
        limit = time.monotonic() + timeout_s + 2.0  # Redis answers a BLPOP by its timeout
        with redis_errors("wait for a slice"):
            conn = self.scripts._connection("pop")
            try:
                conn.send_command("BLPOP", key, f"{timeout_s:.3f}")
                got = read_by(conn, limit if deadline is None else min(limit, deadline))
            except DeadlinePassed:
                if deadline is not None and time.monotonic() >= deadline - 0.001:
                    raise
                raise redis.TimeoutError(f"no reply to BLPOP within {timeout_s + 2:.1f} s") from None
            except BaseException:
                conn.disconnect()
                raise
        return got[1] if got else None

    def _withdraw(self, request_id: str) -> None:
        """Withdraw a request whose caller is leaving now, before returning: a withdrawal left to
        `abandon`'s thread dies with a process that is exiting (Ctrl-C, SIGTERM), and the request
        would stay queued, to be granted or to preempt for nobody, until its wait TTL. Within 2 s,
        else in the background as `abandon` does."""
        try:
            self.give_up(request_id, deadline=time.monotonic() + 2.0)
        except (DeadlinePassed, PrefectMigError):
            self.abandon(request_id)

    def abandon(self, request_id: str) -> None:
        """Withdraw a request whose caller is leaving, in the background until Redis answers
        (at most a minute): cancelled, or released if it was granted meanwhile. For a wait that
        Redis failed under (`RedisUnavailable`): `wait_for_grant` does it, other waiters (the HTTP
        API's) call it."""

        def withdraw() -> None:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    return self.give_up(request_id)
                except (RedisUnavailable, LeaseNotOwned):
                    time.sleep(0.5)

        threading.Thread(target=withdraw, name=f"withdraw-{request_id[:8]}", daemon=True).start()

    def acquire(
        self, request: SliceRequest, *, timeout_s: float | None = None, stop: threading.Event | None = None
    ) -> LeaseInfo:
        """Grant a slice, waiting up to `timeout_s` (``None``: as long as it takes; 0: no wait).
        The timeout holds within about 100 ms even while Redis does not answer; `stop` ends the
        wait as `wait_for_grant`'s does.

        Raises:
            ConfigError: `timeout_s` is not None nor a finite number of seconds from 0 to 30 days.
        """
        timeout_s = check_wait(timeout_s)
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        request_id = uuid.uuid4().hex
        try:
            got = self.try_acquire(request, wait=timeout_s != 0, request_id=request_id, deadline=deadline, wait_s=timeout_s)
        except (KeyboardInterrupt, SystemExit):  # it may have queued, or been granted, before the signal
            self._withdraw(request_id)
            raise
        except DeadlinePassed:
            self.abandon(request_id)
            raise WaitTimeout(
                f"no slice within {_seconds(timeout_s)} s (Redis did not answer); the request is withdrawn.",
                lease_id=request_id,
            ) from None
        except RedisUnavailable:  # its command may have run with only the replies lost: withdraw it
            self.abandon(request_id)
            raise
        if isinstance(got, LeaseInfo):
            return got
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.wait_for_grant(got.request_id, left, stop=stop, request=request, asked_s=timeout_s, explain=True)

    def lease(self, lease_id: str) -> LeaseInfo:
        """The lease as Redis holds it.

        Raises:
            LeaseLost: no such lease (released, expired or never granted).
        """
        with redis_errors("read a lease"):
            raw = {decode(k): decode(v) for k, v in self.redis.hgetall(self.keys.lease(lease_id)).items()}
            slice_json = self.redis.hget(self.keys.slices, raw.get("slice", "")) if raw else None
        if not raw or not slice_json:
            raise LeaseLost(f"lease {lease_id} does not exist (released or expired).", reason="gone", lease_id=lease_id)
        return LeaseInfo(
            lease_id=lease_id,
            fence=int(raw["fence"]),
            slice=SliceRecord.model_validate_json(decode(slice_json)),
            expires_at_ms=int(raw["expires_at"]),
            holder=raw.get("holder", ""),
            tenant=raw.get("tenant", "default"),
            priority=int(raw.get("priority", 0)),
            ttl_ms=int(raw.get("ttl_ms", 60_000)),
            waited_ms=int(raw.get("waited_ms", 0)),
            revoked="revoked_at" in raw,
        )

    def renew(self, lease_id: str, fence: int, ttl_s: float | None = None) -> int:
        """Extend the lease to now + `ttl_s` (None: the lease's own TTL, the one it was granted or
        last renewed with); returns the new expiry (ms).

        Raises:
            LeaseNotOwned: `fence` is not the lease's token.
            LeaseLost: the lease expired, was revoked (preempted) or is gone.
        """
        ttl_ms = "" if ttl_s is None else int(check_ttl(ttl_s, self.max_ttl_s) * 1000)
        reply = self._run("renew", lease_id, fence, ttl_ms, action="renew a lease")
        code = reply[0]
        if code == "ok":
            return int(reply[1])
        if code == "stale":
            raise LeaseNotOwned(
                f"lease {lease_id}: fencing token {fence} is stale or wrong (not the one this lease was granted "
                "with); not renewed (this message never tells the right one).",
                lease_id=lease_id,
            )
        if code == "revoked":
            why = "by an admin" if reply[2] == "admin" else f"for a priority-{reply[2]} request"
            raise LeaseLost(
                f"lease {lease_id} was revoked {why}; stop using the slice "
                f"and release it (it is taken back within {int(reply[3]) / 1000:g} s).",
                reason="revoked",
                lease_id=lease_id,
            )
        if code == "expired":
            raise LeaseLost(f"lease {lease_id} expired: renew came too late.", reason="expired", lease_id=lease_id)
        raise LeaseLost(  # no record: released, expired and reaped, or never granted here (a typo, another namespace)
            f"lease {lease_id} is not held here (released, expired, or never granted in this cluster): nothing to renew.",
            reason="gone", lease_id=lease_id,
        )

    def revoke(self, lease_id: str) -> int | None:
        """Take a lease back from its holder without its fence (an admin's power): the holder is
        told at once, as a preempted one is, and must stop; its lease keeps at most the cluster's
        grace from the holder's next renew. The slice goes on when the holder releases it or the
        lease expires (on a node whose agent fences containers, after the agent removed the
        holder's), never while the holder may still use it. Returns the lease's current expiry
        (ms), None when it was already gone."""
        reply = self._run("release", lease_id, 0, "revoke", action="revoke a lease")
        return int(reply[1]) if reply[0] == "revoked" else None

    def release(self, lease_id: str, fence: int) -> bool:
        """Give the slice back. Idempotent: False when the lease was already gone.

        Raises:
            LeaseNotOwned: `fence` is not the lease's token (the slice belongs to someone else now).
        """
        reply = self._run("release", lease_id, fence, action="release a lease")
        if reply[0] == "stale":
            raise LeaseNotOwned(
                f"lease {lease_id}: fencing token {fence} is stale or wrong; not released "
                "(this message never tells the right one).",
                lease_id=lease_id,
            )
        return reply[0] == "ok"

    def cancel(self, request_id: str) -> str:
        """Withdraw a waiting request: ``cancelled``, ``granted`` (it won meanwhile) or ``gone``."""
        return self._run("cancel", request_id, action="withdraw a request")[0]

    def give_up(self, request_id: str, *, deadline: float | None = None) -> None:
        """Withdraw a request whose caller no longer wants it, releasing it if it was granted
        meanwhile (even claimed): afterwards it holds nothing and waits for nothing. `deadline`
        (monotonic) bounds the withdrawal's reply (`DeadlinePassed`)."""
        reply = self._run("cancel", request_id, action="withdraw a request", deadline=deadline)
        if reply[0] == "granted":  # granted in the last instant: give it back
            self.release(request_id, int(reply[1]))

    def reap(self, *, limit: int = 100) -> tuple[int, int, int]:
        """Expire overdue leases, drop abandoned requests, take lost nodes out of service.
        Returns (expired, dropped, nodes lost)."""
        return tuple(int(x) for x in self._run("reap", limit, action="reap"))  # type: ignore[return-value]

    def reap_announced(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """`reap`, then take up to `limit` of the transitions waiting to be announced as Prefect
        events: ``{"type": "lease.expired", "lease", "slice" (SliceRecord JSON), "tenant", "holder",
        "held_ms", "at"}``, ``{"type": "agent.stale", "node", "at"}`` (a node's heartbeat lapsed) and
        ``{"type": "agent.recovered", "node", "silent_ms", "at"}`` (its agent heartbeated or published
        again after such a lapse), oldest first. Each is
        handed to one caller only, whichever process made the transition (an expiry in `acquire`
        or `renew` too), so a caller that takes them must emit them."""
        reply = self._run("reap", limit, limit, action="reap")
        return [json.loads(x) for x in reply[3:]]

    def _event(self, pipe, event_type: str, /, **fields: Any) -> None:
        """Append a transition made outside the scripts to the stream, and count it, as they do."""
        pipe.xadd(self.keys.events, {"type": event_type, "at": self.now_ms(), **fields},
                  maxlen=self.scripts._events_maxlen, approximate=True)
        pipe.hincrby(self.keys.counters, f"event:{event_type}", 1)

    def record_event(self, event_type: str, /, **fields: Any) -> None:
        """Record a transition that happened outside Redis (e.g. ``container.fenced`` by an agent)."""
        with redis_errors(f"record a {event_type} event"):
            pipe = self.redis.pipeline(transaction=True)
            self._event(pipe, event_type, **fields)
            pipe.execute()

    def cluster_id(self) -> str:
        """This cluster's id (Redis plus namespace), which task containers carry in their labels.

        The first caller makes it with ``SET NX``; every call puts back the id this client already
        knew, the same way, so the labels of running containers stay valid if Redis lost its data.
        """
        candidate = self._cluster_id or uuid.uuid4().hex[:16]
        with redis_errors("read the cluster id"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.keys.cluster_id, candidate, nx=True).get(self.keys.cluster_id)
            _, current = pipe.execute()
        self._cluster_id = decode(current)
        return self._cluster_id

    def configure_cluster(self, *, grace_s: float) -> None:
        """Set the cluster's preemption grace (kept in Redis, for every client): how long a revoked
        holder may keep its slice after it was told. At least `GRACE_FLOOR_S`."""
        if not (isinstance(grace_s, (int, float)) and math.isfinite(grace_s) and grace_s >= GRACE_FLOOR_S):
            raise ConfigError(
                f"grace_s={grace_s!r}: the preemption grace must be a finite number of seconds, at least "
                f"{GRACE_FLOOR_S:g} (a revoked holder needs time to stop its container).",
                field="grace_s",
                value=grace_s,
            )
        with redis_errors("configure the cluster"):
            self.redis.hset(self.keys.config, "grace_ms", int(grace_s * 1000))

    def revocation_overdue(self, lease_id: str) -> bool:
        """Whether the lease was revoked longer than the cluster's grace ago: its holder was told and
        had the grace to stop. The node agent then stops the holder's container itself and releases
        the lease, so the slice goes to the request that revoked it without waiting for the lease to
        expire (a dead holder never releases)."""
        with redis_errors("read a revocation"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(self.keys.lease(lease_id), "revoked_at").hget(self.keys.config, "grace_ms")
            revoked_at, grace = pipe.execute()
        if revoked_at is None:
            return False
        grace_ms = max(int(decode(grace)) if grace else DEFAULT_GRACE_MS, int(GRACE_FLOOR_S * 1000))
        return self.now_ms() >= int(decode(revoked_at)) + grace_ms

    def set_quota(self, tenant: str, quota: Quota | None) -> None:
        """Limit a tenant's concurrent slices and compute slices (``None`` removes the limit)."""
        body = "" if quota is None else quota.model_dump_json()
        self._run("set_quota", tenant, body, action=f"set the quota of {tenant}")

    def quotas(self) -> list[dict[str, Any]]:
        """Each tenant with a quota, by name: its limits (``slices``, ``compute``; ``None`` for no
        limit) and what its live leases hold now (``slices_held``, ``compute_held``)."""
        k = self.keys
        with redis_errors("read the quotas"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(k.quotas).hgetall(k.tenant_slices).hgetall(k.tenant_compute)
            quotas, held, compute = ({decode(a): decode(b) for a, b in m.items()} for m in pipe.execute())
        return [
            {**{"slices": None, "compute": None}, **json.loads(body), "tenant": tenant,
             "slices_held": int(held.get(tenant) or 0), "compute_held": int(compute.get(tenant) or 0)}
            for tenant, body in sorted(quotas.items())
        ]

    def status(self) -> dict[str, Any]:
        """A snapshot for people and scripts: slices with their state and lease, the queue, and the
        GPU models node agents built from NVML (``models``; registered in this process, so plans
        made from this snapshot can name them)."""
        k = self.keys
        with redis_errors("read the status"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(k.slices).hgetall(k.slice_state).zrange(k.leases, 0, -1)
            pipe.zrange(k.waiting, 0, -1).hgetall(k.requests).hgetall(k.nodes).zrange(k.node_deadline, 0, -1)
            pipe.smembers(k.drained_nodes)
            slices, states, leases, waiting, requests, nodes, alive, drained = pipe.execute()
        d = lambda m: {decode(a): decode(b) for a, b in m.items()}  # noqa: E731
        slices, states, requests = d(slices), d(states), d(requests)
        alive, drained = {decode(n) for n in alive}, {decode(n) for n in drained}
        rows = []
        for sid, raw in slices.items():
            state, _, owner = states.get(sid, "?").partition("|")
            rows.append({**json.loads(raw), "state": state, "lease": owner or None})
        rows.sort(key=lambda r: (r["node"], r["gpu_index"], r["start"]))
        queue = []
        for rid in (decode(r) for r in waiting):
            if rid in requests:
                r = json.loads(requests[rid])
                queue.append({k2: r.get(k2) for k2 in ("id", "priority", "tenant", "holder", "pkeys", "node", "enqueued_at")})
        return {
            "nodes": {
                name: {**json.loads(body), "alive": name in alive, "drained": name in drained}
                for name, body in d(nodes).items()
            },
            "slices": rows,
            "leases": self._lease_rows([decode(lid) for lid in leases]),
            "queue": queue,
            "models": {
                name: {
                    "device_name": m.device_name, "built_from_nvml": m.built_from_nvml,
                    "memory_slices": m.memory_slices, "compute_slices": m.compute_slices,
                    "profiles": list(m.profile_names),
                }
                for name, m in sorted(self.load_models().items())
            },
        }

    def _lease_rows(self, lease_ids: list[str]) -> list[dict[str, Any]]:
        with redis_errors("read the leases"):
            pipe = self.redis.pipeline(transaction=False)
            for lease_id in lease_ids:
                pipe.hgetall(self.keys.lease(lease_id))
            rows = pipe.execute() if lease_ids else []
        out = []
        for lease_id, raw in zip(lease_ids, rows):
            fields = {decode(a): decode(b) for a, b in raw.items()}
            fields.pop("request", None)
            out.append({"lease_id": lease_id, **fields})
        return out

    def now_ms(self) -> int:
        """The allocator's time: the injected clock's, else Redis ``TIME`` (what scripts use)."""
        if self.clock is not None:
            return self.clock.now_ms()
        with redis_errors("read the time"):
            seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def recent_events(self, count: int) -> list[dict[str, str]]:
        """The newest `count` transitions, oldest first."""
        with redis_errors("read events"):
            entries = self.redis.xrevrange(self.keys.events, count=count)
        return [{"id": decode(i), **{decode(a): decode(b) for a, b in f.items()}} for i, f in reversed(entries)]

    def events(self, count: int | None = None) -> list[dict[str, str]]:
        """The transition log, oldest first."""
        with redis_errors("read events"):
            entries = self.redis.xrange(self.keys.events, count=count)
        return [{"id": decode(i), **{decode(a): decode(b) for a, b in f.items()}} for i, f in entries]
