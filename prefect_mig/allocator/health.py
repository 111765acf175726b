"""How a cluster is doing, in words people act on: each node agent's heartbeat age (stale ones
flagged), and why a queued request still waits.

The agents' last heartbeats are kept apart from the reaper's deadlines (``Keys.heartbeats``), so
"node-a's agent last heartbeated 45 s ago" can be said after the reaper took the node out of service.

Examples:
    ```python
    from prefect_mig.allocator import Allocator, SliceRequest
    from prefect_mig.allocator.health import agents, wait_reasons
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        assert agents(alloc)["node-a"]["stale"] is False
        alloc.try_acquire(SliceRequest(profile="4g.24gb"))
        queued = alloc.try_acquire(SliceRequest(profile="4g.24gb"), wait=True)
        assert wait_reasons(alloc, queued.request_id) == ["position 1 of 1 in the queue"]
    ```
"""

from __future__ import annotations

import json
from typing import Any

from prefect_mig.allocator.allocator import Allocator
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.models import decode


def agents(allocator: Allocator) -> dict[str, dict[str, Any]]:
    """Each published node's agent: seconds since its last heartbeat (``age_s``, None if never
    recorded), its heartbeat TTL, whether it is ``stale`` (silent past that TTL), and ``agent``:
    who wrote that heartbeat, from its node claim (``host``, ``pid``, ``id``), or None for a beat
    written without a claim (``publish_fleet``) or never."""
    with redis_errors("read the agents' heartbeats"):
        pipe = allocator.redis.pipeline(transaction=True)
        pipe.hkeys(allocator.keys.nodes).hgetall(allocator.keys.heartbeats)
        nodes, beats = pipe.execute()
    now = allocator.now_ms()
    out: dict[str, dict[str, Any]] = {}
    for node in sorted(decode(n) for n in nodes):
        raw = beats.get(node) or beats.get(node.encode())
        if raw is None:
            out[node] = {"age_s": None, "ttl_s": None, "stale": True, "agent": None}
            continue
        beat = json.loads(decode(raw))
        age_ms = max(0, now - int(beat["at"]))
        out[node] = {"age_s": age_ms / 1000, "ttl_s": beat["ttl_ms"] / 1000, "stale": age_ms > beat["ttl_ms"],
                     "agent": beat_writer(beat)}
    return out


def beat_writer(beat: dict[str, Any]) -> dict[str, Any] | None:
    """The agent that wrote a heartbeat record, from the node claim it holds: ``host``, ``pid``,
    ``id`` (None for a beat without a claim, or a claim this version cannot read)."""
    claim = beat.get("agent")
    if not claim:
        return None
    try:
        found = json.loads(claim)
        return {"host": str(found["host"]), "pid": int(found["pid"]), "id": str(found.get("id", ""))}
    except (ValueError, TypeError, KeyError):
        return None

def serving(allocator: Allocator, nodes: list[str]) -> bool:
    """Whether an agent serves each of `nodes` now: it holds its node claim and its own heartbeat
    is fresh. An agent stopped cleanly (SIGTERM, as `prefect-mig down` stops it) gave its claim back
    at once, while its last heartbeat stays fresh for its TTL; the agent that claims the node next
    serves once it has heartbeated itself (a beat written without a claim counts for any)."""
    beats = agents(allocator)
    if not all(n in beats and not beats[n]["stale"] for n in nodes):
        return False
    if not nodes:
        return True
    with redis_errors("read the agents' node claims"):
        pipe = allocator.redis.pipeline(transaction=True)
        pipe.mget([allocator.keys.agent(n) for n in nodes]).hmget(allocator.keys.heartbeats, nodes)
        claims, last = pipe.execute()
    for claim, beat in zip(claims, last):
        if claim is None or beat is None:
            return False
        by = json.loads(decode(beat)).get("agent")
        if by is not None and by != decode(claim):
            return False
    return True


def wait_reasons(allocator: Allocator, request_id: str) -> list[str]:
    """Why a queued request still waits, in words: its place in the queue, its tenant's quota, a
    node it names that nobody published, drained nodes it could use, agents whose heartbeat lapsed, kinds of slices no
    GPU is carved into (and whether a repartitioner runs)."""
    k = allocator.keys
    with redis_errors("read why a request waits"):
        pipe = allocator.redis.pipeline(transaction=True)
        pipe.zrank(k.waiting, request_id).zcard(k.waiting).hget(k.requests, request_id)
        pipe.smembers(k.pkeys).exists(k.repartitioner).hkeys(k.nodes).smembers(k.drained_nodes)
        rank, queued, raw, carved, repartitioner, nodes, drained = pipe.execute()
    reasons = []
    if rank is not None:
        reasons.append(f"position {rank + 1} of {queued} in the queue")
    request = json.loads(decode(raw)) if raw else {}
    wanted, pinned = request.get("pkeys", []), request.get("node") or None
    nodes, drained = sorted(decode(n) for n in nodes), sorted(decode(n) for n in drained)
    if pinned and nodes and pinned not in nodes:
        reasons.append(f"no node named {pinned} is published (nodes: {', '.join(nodes)})")
    reasons += [
        f"{node} is drained for maintenance: no new grants there until `prefect-mig node resume {node}`"
        for node in drained if pinned in (None, node)
    ]
    reasons += _quota_reasons(allocator, request.get("tenant"), wanted)
    carved = {decode(c) for c in carved}
    if wanted and not set(wanted) & carved:
        here = {c.split("/", 1)[0] for c in carved}  # one queued before any node published wants every model's kinds
        kinds = ", ".join(sorted({p.split("/", 1)[-1] for p in wanted if p.split("/", 1)[0] in here}
                                 or {p.split("/", 1)[-1] for p in wanted}))
        reasons.append(
            f"no GPU carved for {kinds}; a repartitioner "
            + ("is running and will carve one" if repartitioner else
               "is not running (start one with `prefect-mig up` or `prefect-mig repartition serve`, "
               "or carve one with `prefect-mig layout apply`)")
        )
    beats = agents(allocator)
    if not beats:
        reasons.append("no node agent has published any GPU (start `prefect-mig agent` or `prefect-mig up`)")
    elif all(a["stale"] for a in beats.values()):
        reasons.append("no node agent is alive")
    for node, a in beats.items():
        if a["stale"]:
            reasons.append(
                f"{node}'s agent last heartbeated {a['age_s']:.0f} s ago" if a["age_s"] is not None
                else f"{node}'s agent has not heartbeated"
            )
    return reasons


def _quota_reasons(allocator: Allocator, tenant: str | None, wanted: list[str]) -> list[str]:
    """The tenant's quota, when it holds the request back (a queued request waits for it even
    beside free slices)."""
    if not tenant or not wanted:
        return []
    k = allocator.keys
    with redis_errors("read the tenant's quota"):
        pipe = allocator.redis.pipeline(transaction=True)
        pipe.hget(k.quotas, tenant).hget(k.tenant_slices, tenant).hget(k.tenant_compute, tenant)
        body, held, compute_held = pipe.execute()
    if not body:
        return []
    quota, held, compute_held = json.loads(decode(body)), int(held or 0), int(compute_held or 0)
    needs = min(int(p.split("/", 1)[-1].split("g", 1)[0]) for p in wanted)
    if quota.get("slices") is not None and held >= quota["slices"]:
        return [f"tenant {tenant} holds {held} slice(s), its quota (`prefect-mig quota list`)"]
    if quota.get("compute") is not None and compute_held + needs > quota["compute"]:
        return [f"tenant {tenant} holds {compute_held} of its quota of {quota['compute']} compute slice(s), "
                f"and a {needs}g needs {needs} (`prefect-mig quota list`)"]
    return []


def sweep_announced(allocator: Allocator) -> list[tuple[str, dict[str, Any]]]:
    """Sweep (`Allocator.reap_announced`) and return what to announce as ``(event type, fields)``,
    oldest first: ``lease.expired`` as the script recorded it, ``agent.stale`` with
    ``heartbeat_age_s`` (seconds since the node's agent last heartbeated, None if never). What it
    returns is taken from Redis: the caller emits it, nobody else will."""
    taken = allocator.reap_announced()
    if not taken:
        return []
    beats = agents(allocator) if any(a["type"] == "agent.stale" for a in taken) else {}
    out = []
    for a in taken:
        kind = a.pop("type")
        if kind == "agent.stale":
            a["heartbeat_age_s"] = beats.get(a.get("node", ""), {}).get("age_s")
        out.append((kind, a))
    return out
