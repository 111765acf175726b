"""The allocator's half that changes layouts: taking GPUs and nodes out of service (maintenance), taking
slices out of service before a re-carve (at once, or as their leases end: the range drain), the
desired layouts the repartitioner writes and node agents apply, and the repartitioner's announcement.

`LayoutChanges` is mixed into `prefect_mig.allocator.Allocator`, which provides the Redis client,
the keys, the scripts (`_run`, `_run_for_node`) and the event stream (`_event`); use it through an `Allocator`.

Examples:
    ```python
    from prefect_mig.allocator import Allocator
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), namespace="doc")
        (gpu,) = alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["7g.80gb@0"]})
        alloc.set_desired(gpu.gpu_uuid, "3g.40gb@0 + 3g.40gb@4", kind="incremental")
        assert alloc.desired(gpu.gpu_uuid)["layout"] == "3g.40gb@0 + 3g.40gb@4"
        assert alloc.withdraw([gpu.id]) is None  # idle: out of service until re-published
        alloc.clear_desired(gpu.gpu_uuid, outcome="applied")
        assert alloc.desired(gpu.gpu_uuid) is None
    ```
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from prefect_mig.allocator.models import decode
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.errors import AllocationError, ConfigError


class LayoutChanges:
    """Out-of-service slices, GPUs and nodes, and desired layouts; mixed into `Allocator`."""

    def drain(self, gpu_uuid: str) -> int:
        """Stop granting on a GPU; returns how many of its slices are still leased."""
        reply = self._run("drain", gpu_uuid, "1", action=f"drain GPU {gpu_uuid}")
        if reply[0] == "unknown":
            raise AllocationError(f"GPU {gpu_uuid} is not in the inventory.")
        return int(reply[1])

    def resume(self, gpu_uuid: str) -> int:
        reply = self._run("drain", gpu_uuid, "0", action=f"resume GPU {gpu_uuid}")
        if reply[0] == "unknown":
            raise AllocationError(f"GPU {gpu_uuid} is not in the inventory.")
        return int(reply[1])

    def drain_node(self, node: str, *, drain: bool = True) -> list[str]:
        """Stop granting on a node for maintenance (``drain=False``: resume it). Leases held there
        run on; their slices stay out of service when they end. Returns the ids of the leases still
        held on the node. Apart from the GPU drain the repartitioner uses: neither undoes the other."""
        verb = "drain" if drain else "resume"
        reply = self._run("drain_node", node, "1" if drain else "0", action=f"{verb} node {node}")
        if reply[0] == "unknown":
            with redis_errors("read the nodes"):
                known = sorted(decode(n) for n in self.redis.hkeys(self.keys.nodes))
            raise ConfigError(
                f"node: {node!r} has never published an inventory to this cluster; published nodes: "
                f"{', '.join(known) or 'none (start `prefect-mig agent` on each host)'}.",
                field="node",
                value=node,
            )
        return [str(x) for x in reply[1:]]

    def withdraw(self, slice_ids: Sequence[str], *, node: str | None = None, agent: str | None = None) -> str | None:
        """Take idle slices out of service before destroying them; None when done, else the id of
        a slice in use (leased, busy with processes or a task container its agent saw, or
        quarantined after its holder's lease expired; then nothing was withdrawn). They stay out
        of service until the publish that no longer lists them, or `restore`.

        A node agent passes its `node` and its claim on it (`agent`, as for `publish`): the write
        is refused (`NodeNotClaimed`) once the node's claim is no longer its own. The same holds for
        `withdraw_when_idle` and `restore`."""
        reply = self._run_for_node("withdraw", node, agent, json.dumps(list(slice_ids)), "now", action="withdraw slices")
        return None if reply[0] == "ok" else reply[1]

    def withdraw_when_idle(self, slice_ids: Sequence[str], *, node: str | None = None, agent: str | None = None) -> int:
        """The range drain: take the idle slices out of service now and the leased ones as soon as
        their leases end (their leases run on untouched). Returns how many are still in use
        (leased, busy or quarantined, as `withdraw` counts them)."""
        reply = self._run_for_node("withdraw", node, agent, json.dumps(list(slice_ids)), "drain", action="drain slices")
        return int(reply[2])

    def withheld(self, gpu_uuid: str) -> dict[str, str]:
        """The GPU's slices withdrawn for a re-carve (all of a drain's, leased ones included), with
        each one's state: ``withdrawn`` once out of service, else what it is until then."""
        with redis_errors("read a GPU's withdrawn slices"):
            ids = sorted(decode(x) for x in self.redis.hkeys(self.keys.gpu_slices(gpu_uuid)))
            if not ids:
                return {}
            pipe = self.redis.pipeline(transaction=False)
            for sid in ids:
                pipe.sismember(self.keys.withholding, sid)
            pipe.hmget(self.keys.slice_state, ids)
            *member, states = pipe.execute()
        return {sid: decode(state) or "" for sid, inside, state in zip(ids, member, states) if inside}

    def restore(self, slice_ids: Sequence[str], *, node: str | None = None, agent: str | None = None) -> None:
        """Put withdrawn slices back into service (a re-carve was given up). `node`, `agent`: as
        for `withdraw` (a stale agent's late restore would put back slices that the agent serving
        the node now withdrew to destroy)."""
        self._run_for_node("withdraw", node, agent, json.dumps(list(slice_ids)), "restore", action="restore slices")

    def set_desired(self, gpu_uuid: str, layout: str, *, kind: str, drain_timeout_s: float | None = None) -> None:
        """Ask the GPU's agent to carve `layout` (``kind``: incremental or drain). A drain gives up
        after `drain_timeout_s` (the planner's, from the expected remaining run time of the leases
        in its way), or after the agent's own timeout when None."""
        record = {"layout": layout, "kind": kind, "at": time.time()}
        if drain_timeout_s is not None:
            record["drain_timeout_s"] = float(drain_timeout_s)
        body = json.dumps(record)
        with redis_errors("write a desired layout"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.desired, gpu_uuid, body)
            self._event(pipe, "layout.desired", gpu=gpu_uuid, layout=layout, kind=kind)
            pipe.execute()

    def announce_repartitioner(self, ttl_s: float) -> None:
        """Say a repartitioner runs for the next `ttl_s` seconds: meanwhile requests may wait for
        kinds of slices no GPU is carved into yet, instead of failing as `Unsatisfiable`."""
        with redis_errors("announce the repartitioner"):
            self.redis.set(self.keys.repartitioner, str(time.time()), px=int(ttl_s * 1000))

    def repartitioner_running(self) -> bool:
        """Whether a repartitioner announced itself and its announcement has not lapsed."""
        with redis_errors("look for a repartitioner"):
            return bool(self.redis.exists(self.keys.repartitioner))

    def desired(self, gpu_uuid: str) -> dict | None:
        with redis_errors("read a desired layout"):
            raw = self.redis.hget(self.keys.desired, gpu_uuid)
        return json.loads(decode(raw)) if raw else None

    def clear_desired(
        self, gpu_uuid: str, *, outcome: str, detail: str = "", applied: dict | None = None,
        node: str | None = None, agent: str | None = None,
    ) -> bool:
        """The agent is done with the GPU's desired layout: ``applied`` or ``skipped`` (why). With
        `applied` (the record as `desired` returned it) it goes only if it is still that one: a
        newer one written meanwhile stays, for the agent's next round. `node`, `agent`: as for
        `withdraw` (a stale agent's late clear would delete the layout the agent serving the node
        now is asked to apply). True if it went."""
        record = json.dumps(applied) if applied is not None else ""
        reply = self._run_for_node("clear_desired", node, agent, gpu_uuid, outcome, detail, record,
                                   action=f"clear the desired layout of GPU {gpu_uuid}")
        return reply[0] == "cleared"
