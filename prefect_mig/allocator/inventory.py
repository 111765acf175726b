"""The allocator's inventory half: what node agents publish (nodes, GPUs, slices, GPU models built
from NVML), their heartbeats, and the fencing of slices whose holder's lease expired.

`Inventory` is mixed into `prefect_mig.allocator.Allocator`, which provides the Redis client, the
keys, the scripts (`_run`; `_run_for_node` for the writes an agent makes for its node, fenced by
its claim) and the clock (`now_ms`); use it through an `Allocator`.

Examples:
    ```python
    from prefect_mig.allocator import Allocator
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), namespace="doc")
        alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
        assert [g["gpu_model"] for g in alloc.gpus()] == ["H100-80GB"]
        assert alloc.heartbeat("node-a") == "ok" and alloc.heartbeat("node-b") == "unknown"
    ```
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from prefect_mig.allocator.models import SliceRecord, decode, slice_record
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.errors import ConfigError, NodeInUse, UnknownGpuModel
from prefect_mig.model import FleetSpec, GpuModel, Layout, catalog, get_model, register_model

log = logging.getLogger("prefect_mig.allocator")


def _known(model_name: str) -> bool:
    try:
        get_model(model_name)
    except UnknownGpuModel:
        return False
    return True



class Inventory:
    """Publishing and reading the inventory; mixed into `Allocator` (see the module docstring)."""

    def publish(
        self,
        node: str,
        gpus: Sequence[dict],
        slices: Sequence[SliceRecord],
        *,
        docker_url: str | None = None,
        heartbeat_ttl_s: float = 30.0,
        fence_settle_s: float | None = None,
        agent: str | None = None,
    ) -> tuple[int, int, int]:
        """Publish a node's whole inventory; slices it leaves out are removed (leased ones when
        their lease ends). Returns (published, removed, handed to waiters).

        `agent` is given by a node agent that claimed the node (`claim_node`): the publish is
        applied only while that claim is still its own, since one delayed in the network past the
        claim's TTL could land after another agent re-carved the GPU, bringing back slices that no
        longer exist (`NodeNotClaimed` then). The agent's other writes for its node (`heartbeat`,
        `node_down`, `settle_fenced`, `withdraw`, `withdraw_when_idle`, `restore`) take it too.

        `fence_settle_s` is given by an agent that fences this node's task containers: a slice whose
        lease expires then stays quarantined until that agent confirms the holder's container gone
        (`settle_fenced`), at most this long. Without it (a simulated fleet) it is offered at once."""
        body: dict[str, Any] = {"node": node, "docker_url": docker_url, "published_at": time.time()}
        if fence_settle_s is not None:
            body["fence_settle_ms"] = int(fence_settle_s * 1000)
        node_json = json.dumps(body)
        reply = self._run_for_node(
            "publish",
            node,
            agent,
            node,
            node_json,
            int(heartbeat_ttl_s * 1000),
            json.dumps(list(gpus)),
            json.dumps([s.model_dump() for s in slices]),
            self._epoch,
            int(self.max_ttl_s * 1000),
            action=f"publish the inventory of node {node}",
            keys=(self.keys.forgotten(node),),
        )
        self._note_heartbeat(node, heartbeat_ttl_s, agent)
        self._epoch = str(reply[3])
        return tuple(int(x) for x in reply[:3])  # type: ignore[return-value]

    def publish_fleet(
        self, fleet: str | FleetSpec, *, layouts: dict[str, list[str]], heartbeat_ttl_s: float = 30.0
    ) -> list[SliceRecord]:
        """Publish an inventory straight from a fleet spec and layout strings (simulator, tests,
        benchmarks): no GPU backend involved. ``layouts[node][i]`` is GPU i's layout."""
        spec = fleet if isinstance(fleet, FleetSpec) else FleetSpec.parse(fleet)
        published = []
        for node in spec.nodes:
            gpus, slices = [], []
            for index, model_name in enumerate(node.gpus):
                model = get_model(model_name)
                gpu_uuid = "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{spec}:{node.name}:{index}"))
                gpus.append({"uuid": gpu_uuid, "index": index, "gpu_model": model.name})
                texts = layouts.get(node.name, [])
                layout = Layout.parse(model.name, texts[index] if index < len(texts) else "").validate_on(model)
                for gi, placement in enumerate(layout.instances, start=1):
                    mig = "MIG-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{gpu_uuid}:{placement}"))
                    slices.append(
                        slice_record(
                            model, placement.profile, placement.start,
                            node=node.name, gpu_uuid=gpu_uuid, gpu_index=index, gpu_instance_id=gi, mig_uuid=mig,
                        )
                    )
            self.publish(node.name, gpus, slices, heartbeat_ttl_s=heartbeat_ttl_s)
            published.extend(slices)
        return published

    def heartbeat(self, node: str, *, ttl_s: float = 30.0, agent: str | None = None) -> str:
        """Keep a node in service; returns ``ok``, ``back`` (was lost) or ``unknown``. `agent`: the
        node agent's claim, as for `publish` (`NodeNotClaimed` once the node's claim is not it)."""
        did = self._run_for_node("heartbeat", node, agent, node, int(ttl_s * 1000), "", action=f"heartbeat node {node}")[0]
        if did != "unknown":
            self._note_heartbeat(node, ttl_s, agent)
        return did

    def awaiting_fence(self, node: str) -> dict[str, tuple[str, str]]:
        """The node's slices quarantined because their holder's lease expired, with the expired
        lease and the slice's MIG UUID: ``{slice_id: (lease_id, mig_uuid)}``. Read it before listing
        the node's containers, and pass what is confirmed to `settle_fenced`."""
        with redis_errors("read the slices awaiting fencing"):
            ids = sorted(decode(x) for x in self.redis.smembers(self.keys.node_slices(node)))
            if not ids:
                return {}
            leases = self.redis.hmget(self.keys.awaiting_fence, ids)
            bodies = self.redis.hmget(self.keys.slices, ids)
        return {
            sid: (decode(lease), json.loads(decode(body)).get("mig_uuid", ""))
            for sid, lease, body in zip(ids, leases, bodies)
            if lease is not None and body is not None
        }

    def settle_fenced(self, node: str, confirmed: dict[str, str], *, agent: str | None = None) -> tuple[int, int]:
        """The node's agent confirms that no task container of this cluster runs on these slices
        (``{slice_id: expired lease_id}`` as `awaiting_fence` gave them): they leave quarantine and
        go to waiters. Returns (settled, handed to waiters). `agent`: the agent's claim, as for
        `publish` (`NodeNotClaimed` once the node's claim is not it: a stale agent may have looked
        at the containers of another engine, or before the agent serving the node now started one)."""
        if not confirmed:
            return 0, 0
        reply = self._run_for_node("settle", node, agent, node, json.dumps(sorted(confirmed.items())),
                                   action=f"settle slices of node {node}")
        return int(reply[0]), int(reply[1])

    def node_down(self, node: str, *, why: str, agent: str | None = None) -> str:
        """Take a node out of service now although its agent lives (its Docker engine is down):
        no new grants there until its next `heartbeat`, which returns ``back``. `agent`: the node
        agent's claim, as for `heartbeat`."""
        return self._run_for_node("heartbeat", node, agent, node, 0, why, action=f"take node {node} out of service")[0]

    def claim_node(
        self, node: str, agent: str, *, ttl_s: float, gpus: Sequence[str] = (), replace: str | None = None
    ) -> tuple[str, str] | None:
        """Claim `node` and its `gpus` (UUIDs) for the node agent `agent` (an opaque identity) for
        `ttl_s`, or renew the claim, all or nothing: None when it holds them now, else ``(what,
        identity)`` of the agent that holds one (``what``: ``node <name>`` or ``GPU <uuid>``).
        `replace` (an identity this call gave back, of an agent known dead) is taken over at once."""
        return self._set_node_claim(node, agent, ttl_s=ttl_s, gpus=gpus, allowed=(None, agent, replace),
                                    action=f"claim node {node} for this agent")

    def renew_node_claim(
        self, node: str, agent: str, *, ttl_s: float, gpus: Sequence[str] = ()
    ) -> tuple[str, str | None] | None:
        """Extend `agent`'s claim on `node` and its `gpus` for `ttl_s`, only while the node's claim is
        still `agent`'s: None when extended, else ``(what, identity)`` of the agent holding it, with
        identity None when nobody does (the claim lapsed, or was given back). Unlike `claim_node` it
        never claims a node afresh, so a renewal that reaches Redis after its agent gave the claim
        back (`release_node_claim`) cannot take it again. A GPU of the node with no claim yet (one
        the node gained) is claimed with it."""
        return self._set_node_claim(node, agent, ttl_s=ttl_s, gpus=gpus, allowed=(None, agent), renewing=True,
                                    action=f"renew this agent's claim on node {node}")

    def _set_node_claim(self, node: str, agent: str, *, ttl_s: float, gpus: Sequence[str], allowed: tuple,
                        action: str, renewing: bool = False) -> tuple[str, str | None] | None:
        """Set the claims of `node` and its `gpus` to `agent` for `ttl_s` unless one holds a value
        not in `allowed` (or, `renewing`, the node's is not `agent`'s): then ``(what, value)``."""
        claims = {self.keys.agent(node): f"node {node}", **{self.keys.gpu_agent(g): f"GPU {g}" for g in gpus}}

        def attempt(pipe) -> tuple[str, str | None] | None:
            held = [None if h is None else decode(h) for h in pipe.mget(list(claims))]
            if renewing and held[0] != agent:
                return f"node {node}", held[0]
            for what, current in zip(claims.values(), held):
                if current not in allowed:
                    return what, current
            pipe.multi()
            for key in claims:
                pipe.set(key, agent, px=max(1, int(ttl_s * 1000)))
            return None

        with redis_errors(action):
            return self.redis.transaction(attempt, *claims, value_from_callable=True)

    def release_node_claim(self, node: str, agent: str, *, gpus: Sequence[str] = ()) -> bool:
        """Give back the claim `claim_node` gave `agent` on `node` and its `gpus`: each of those that
        `agent` still holds is freed at once, one another agent holds now is left alone. True if
        any was freed."""
        keys = [self.keys.agent(node), *(self.keys.gpu_agent(g) for g in gpus)]

        def attempt(pipe) -> bool:
            mine = [key for key, held in zip(keys, pipe.mget(keys)) if held is not None and decode(held) == agent]
            pipe.multi()
            if mine:
                pipe.delete(*mine)
            return bool(mine)

        with redis_errors(f"give back this agent's claim on node {node}"):
            return self.redis.transaction(attempt, *keys, value_from_callable=True)

    def forget_node(self, node: str, *, host_is_gone: bool = False) -> tuple[int, int]:
        """Forget a node that is gone for good (renamed: ``status`` would show its old name STALE
        forever; or taken out of the fleet): its record, heartbeat, drain mark, slices and the GPUs
        still published under its name go, all at once. Returns (slices, GPUs) removed. A lease
        there past its expiry is reaped first (no agent runs there to do it).

        `host_is_gone` (``node forget --host-is-gone``): the host is gone for good, so nobody will
        ever fence the task containers of its expired holders; its slices that wait for that go
        too, and a tombstone stays: if its agent ever publishes the node again, every slice of it is
        quarantined until that agent's first fencing pass removed the old task containers, so a
        slice is never granted while one of them may still run there.

        Raises:
            ConfigError: no node of that name is known (names the known ones).
            NodeInUse: an agent claims it or one of its GPUs, a live lease is held on one of its
                slices, or (without `host_is_gone`) a slice of it waits for an expired holder's task
                container to be fenced; nothing is removed.
        """
        for _ in range(10):
            # the script finds the node's GPUs too, and answers 'changed' unless they are these: it is
            # passed every key it touches (Redis Cluster routes a script by them)
            with redis_errors("read the GPUs"):
                raw = self.redis.hgetall(self.keys.gpus)
            gpus = sorted(decode(g) for g, body in raw.items() if json.loads(decode(body)).get("node") == node)
            keys = (self.keys.agent(node), self.keys.node_slices(node), self.keys.forgotten(node),
                    *(self.keys.gpu_agent(g) for g in gpus))
            reply = self._run("forget_node", node, "1" if host_is_gone else "", *gpus, action=f"forget node {node}",
                              keys=keys)
            if reply[0] != "changed":
                break
        else:
            raise NodeInUse(node=node, holds=["an agent that keeps publishing GPUs under its name"])
        if reply[0] == "forgotten":
            with redis_errors(f"forget node {node}'s last heartbeat"):
                self.redis.hdel(self.keys.heartbeats, node)
            return int(reply[1]), int(reply[2])
        if reply[0] == "unknown":
            with redis_errors("read the nodes"):
                known = sorted(decode(n) for n in self.redis.hkeys(self.keys.nodes))
            raise ConfigError(f"node: {node!r} is not known to this cluster; known nodes: {', '.join(known) or 'none'}.",
                              field="node", value=node)
        if reply[0] == "claimed":
            try:
                agent = json.loads(reply[2])
                who = f"the agent pid {agent['pid']} on host {agent['host']} (serving node {agent.get('node', '?')})"
            except (ValueError, TypeError, KeyError):
                who = "an agent"
            raise NodeInUse(node=node, holds=[f"{who} claims {reply[1]}"])
        if reply[0] == "leased":
            raise NodeInUse(node=node, holds=[f"lease {lease}" for lease in reply[1:]], leased=True)
        raise NodeInUse(node=node, holds=[f"slice {sid} awaits the fencing of its expired holder's task container"
                                          for sid in reply[1:]], fencing=True)

    def _note_heartbeat(self, node: str, ttl_s: float, agent: str | None) -> None:
        # kept apart from node_deadline, which the reaper clears: "last heartbeated 45 s ago"; with
        # the agent's claim, so a new agent is not taken as serving on the beat of the one before it
        body = json.dumps({"at": self.now_ms(), "ttl_ms": int(ttl_s * 1000), "agent": agent})
        with redis_errors("record a heartbeat"):
            self.redis.hset(self.keys.heartbeats, node, body)

    def gpus(self) -> list[dict[str, Any]]:
        """The published GPUs (uuid, node, index, gpu_model, layout, ...), by node and index."""
        with redis_errors("read the GPUs"):
            raw = self.redis.hgetall(self.keys.gpus)
        return sorted((json.loads(decode(v)) for v in raw.values()), key=lambda g: (g.get("node", ""), g.get("index", 0)))

    def slice_states(self, slice_ids: Sequence[str]) -> dict[str, str]:
        """Each slice's allocator state (``free``, ``leased:<id>``, ``quarantined...``; ``""`` for
        one Redis does not know)."""
        if not slice_ids:
            return {}
        with redis_errors("read slice states"):
            states = self.redis.hmget(self.keys.slice_state, list(slice_ids))
        return {sid: decode(state or b"") for sid, state in zip(slice_ids, states)}

    def node_docker_url(self, node: str) -> str | None:
        """The Docker engine URL the node's agent published (None: the local engine)."""
        with redis_errors("read a node"):
            raw = self.redis.hget(self.keys.nodes, node)
        return json.loads(decode(raw)).get("docker_url") if raw else None

    def gpu_models(self, *, max_age_s: float = 5.0) -> list[str]:
        """GPU models present in the inventory (cached for `max_age_s`): those of the published
        GPUs, carved or not (a GPU between a re-carve's destroy and its create still counts), and
        of the kinds carved now. Models that node agents built from NVML are made known in this
        process (`load_models`) when one is listed."""
        at, models = self._models
        if time.monotonic() - at > max_age_s or not models:
            with redis_errors("read the inventory's GPU models"):
                pipe = self.redis.pipeline(transaction=False)
                kinds, gpus = pipe.smembers(self.keys.pkeys).hvals(self.keys.gpus).execute()
            on_gpus = {json.loads(decode(g)).get("gpu_model") for g in gpus}
            models = sorted({decode(k).split("/", 1)[0] for k in kinds} | on_gpus - {None})
            if not all(_known(m) for m in models):
                self.load_models()
            unknown = [m for m in models if not _known(m)]  # an agent that publishes no model (an older one)
            if unknown and unknown != self._unknown_models:
                log.warning("GPU model(s) %s in the inventory are unknown here (not in the catalog, not "
                            "published): requests are matched against the others", unknown)
            self._unknown_models = unknown
            self._models = (time.monotonic(), models)
        return models

    def publish_models(self, models: Sequence[GpuModel]) -> int:
        """Publish models built from NVML for GPUs outside the catalog (``built_from_nvml``), so the
        planner, requesters and ``prefect-mig status`` in any process know them; catalog models
        are left out (the catalog ships with every process). Returns how many were published."""
        built = {m.name: m.model_dump_json() for m in models if m.built_from_nvml}
        if built:
            with redis_errors("publish the GPU models built from NVML"):
                self.redis.hset(self.keys.models, mapping=built)
        return len(built)

    def load_models(self) -> dict[str, GpuModel]:
        """The models node agents built from NVML (`publish_models`), by name, each registered in
        this process (`prefect_mig.model.register_model`) so layouts, requests and plans can name
        it. A record that names a catalog model or does not parse is skipped, with a warning."""
        with redis_errors("read the GPU models built from NVML"):
            raw = self.redis.hgetall(self.keys.models)
        found = {}
        cataloged = {name.lower() for name in catalog().models}
        for name, body in ((decode(k), decode(v)) for k, v in raw.items()):
            try:
                model = GpuModel.model_validate_json(body)
            except ValueError as exc:
                log.warning("skipping the published GPU model %r: %s", name, exc)
                continue
            if model.name.lower() in cataloged or not model.built_from_nvml:
                log.warning("skipping the published GPU model %r: the catalog's is authoritative", name)
                continue
            found[model.name] = register_model(model)
        return found
