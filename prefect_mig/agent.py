"""The node agent: publishes this node's GPUs and MIG slices to Redis and keeps them in service.

It reads the layout through the GPU backend, publishes it (a new layout generation per GPU whenever
the layout changed, and the models it built from NVML for GPUs outside the catalog), heartbeats so the allocator keeps granting on this node, reaps expired leases,
stops task containers whose lease is gone, and applies the desired layouts the repartitioner writes:

- incremental: the instances that go are withdrawn from service first (all or nothing, refused if
  one got leased meanwhile), NVML is checked for processes, the GPU is re-carved with explicit
  placements, and the new inventory is published, which hands new slices to waiting requests;
- drain (a range drain): the slices the new layout replaces get no new grants; idle ones leave
  service at once, leased ones when their lease ends, while the rest of the GPU keeps granting.
  When all are out (or `drain_timeout_s` passes: then the change is skipped and the slices go back
  into service) the GPU is re-carved.

Fencing touches only this cluster's task containers on this node (their labels carry the cluster
id kept in Redis, the namespace and the node, or one of this node's MIG devices for a container
started before the node was renamed), so clusters can share a Docker engine; each removal
is logged with the lease id, fence and reason, and a container that vanished meanwhile is fine.
"This cluster's" means labelled with any cluster id this agent has seen: Redis's now and the ones
before it (a new id is made when Redis lost its data), kept in the state dir when the agent has one
(`KnownClusterIds`), so an agent restarted after a wipe still fences its cluster's old containers.
A slice that a running task container in this namespace on this node uses (by its labels) counts
as busy whatever NVML says, whatever cluster id the container carries: one with an id this agent
does not know (another cluster's, or its own from before a wipe it cannot remember) is never
removed, only logged, and its slice stays out of service while it runs. `run` outlives Redis and
Docker errors (logs, backs off, heartbeats again as soon as it can), and `start`, its first round,
an outage of Redis or a lapse of the claim (it claims the node again, then carries on); `serving`
can wait for a Redis that does not answer yet before it claims the node. `carve_empty` carves GPUs
that have MIG on and no instances to a named layout config, and finishes such a carve that a kill
cut short (recorded in the state dir); a stop signal (`terminate`) that lands during a layout change
takes effect once the change is done or rolled back. A program that embeds the agent stops it from
another thread with `stop`, which also ends those waits for Redis at once (`AgentStopped`). A GPU
with MIG off or whose MIG mode change awaits a reset is named, with what to do, once per change of
its modes.

One agent serves a node: it claims the node and its GPUs in Redis (`claim`, `serving`, see
`prefect_mig.node_claim`) and keeps the claim renewed from a thread while it serves, however long a
carve takes; before each change it makes on the node (each carve step, a release, a publish) it
checks the claim, and one another agent took stops it with `NodeTaken`. Its writes for the node
are also fenced in Redis by the claim (`NodeNotClaimed`): the publish, heartbeat (and taking the
node out of service), withdrawing and restoring slices for a re-carve, settling fenced slices,
and clearing a desired layout it is done with (only the one it read: a newer one stays), since one
delayed past the claim's TTL (a network partition, a paused process) would otherwise land after
the agent that took the node over changed it: bring back slices it destroyed, put back into service
slices it withdrew to destroy, or delete the layout it is asked to apply.

A slice whose holder's lease expired (the holder died or hung: it neither renewed nor released)
may still have that holder's task container running on it, so an agent with a Docker engine
publishes a fallback settle time (`fence_settle_s`) and the allocator quarantines such a slice
instead of handing it to the next waiter. Right after fencing, each tick tells the allocator which
of those slices no task container of this cluster uses any more (`settle_quarantine`), and they go
to waiters then; one whose container could not be removed waits until the fallback settle time.

Withdrawn slices stay out of service until the publish that no longer lists them. An agent killed
half way converges when it restarts: it publishes what NVML shows and applies the desired layout
again, keeping what is already in place; a change that fails puts the slices back into service. A
GPU instance left without its compute instance (killed between the two creates) is never leased
(it has no MIG UUID); the next tick that still finds it so gives it its compute instance back
(`repair`).

Examples:
    ```python
    import tempfile
    from prefect_mig.agent import NodeAgent
    from prefect_mig.allocator import Allocator
    from prefect_mig.gpu import GpuBackend, SimulatedNvml
    from prefect_mig.model import Layout
    from prefect_mig.testing.redis_server import RedisServer

    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tempfile.mkdtemp())
    with RedisServer() as server, GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "2g.12gb@0 + 2g.12gb@2"))
        agent = NodeAgent(backend, Allocator(server.client(), "doc"), node="node-a")
        assert agent.publish() == (2, 0, 0)
    ```
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from prefect_mig.allocator import Allocator, SliceRecord
from prefect_mig.allocator.models import slice_record
from prefect_mig.errors import NodeClaimLapsed, NodeNotClaimed, NodeTaken
from prefect_mig.gpu import GpuBackend
from prefect_mig.gpu.host_lock import GpuLocks
from prefect_mig.known_cluster_ids import KnownClusterIds
from prefect_mig.node_claim import NodeClaim
from prefect_mig.state_dir import private_dir, write_private

log = logging.getLogger("prefect_mig.agent")

T = TypeVar("T")

CLAIM_LOST = (NodeTaken, NodeClaimLapsed, NodeNotClaimed)  # this agent no longer holds its node: it changes nothing there


class NodeAgent:
    """Publishes one node's inventory and heartbeats it.

    Args:
        backend: the opened GPU backend of this node.
        allocator: the cluster's allocator.
        node: this node's name.
        docker_url: how runners reach this node's Docker engine (``None``: the local socket).
        heartbeat_ttl_s: without a heartbeat for this long, the node gets no new grants.
        docker_client: this node's Docker engine; when given, each tick stops this cluster's task
            containers on this node whose lease is gone or whose fencing token is stale (a killed
            flow process, a lost lease), and slices its running task containers use count as busy.
        state_dir: where the cluster ids this agent has seen are kept across restarts (the CLI
            passes ``PREFECT_MIG_STATE_DIR``); ``None``: in memory only, so after Redis lost its
            data a restarted agent cannot tell its old task containers from another cluster's and
            keeps their slices out of service without fencing them.
        fence_settle_s: with a `docker_client`: a slice whose lease expired (its holder died) stays
            quarantined until this agent, right after its fencing step, finds no task container of
            the cluster on it (`settle_quarantine`), or at most this long (default: the heartbeat
            TTL) when the engine keeps failing. Without a `docker_client` the agent fences nothing
            and such a slice goes to the next waiter at once.
        drain_timeout_s: a range drain whose leases outlive this is given up (its slices go back
            into service), unless the desired layout carries the planner's own timeout (see
            `Allocator.set_desired`).
        clock: seconds, for the drain timeout (the simulator passes its virtual clock).
        on_event: called as ``on_event(event_type, fields)`` for the lease expiries, stale agents
            and recovered agents its sweeps take (see `reap`), and after each ``layout.applied`` or
            ``layout.skipped`` this agent records (``prefect-mig agent`` passes one that emits a Prefect
            event, when a Prefect API is configured).
        gpu_locks: the host's locks on this node's GPUs (`prefect_mig.gpu.host_lock.GpuLocks`) that
            `serving` holds, so no other process of the host (another cluster's agent, the demo)
            carves them meanwhile; ones already held are this process's (the demo's, which carved
            first) and are kept as they are. Default: its own, in the backend's lock dirs
            (``PREFECT_MIG_GPU_LOCK_DIR`` from the environment for real GPUs).
    """

    def __init__(
        self,
        backend: GpuBackend,
        allocator: Allocator,
        *,
        node: str,
        docker_url: str | None = None,
        heartbeat_ttl_s: float = 30.0,
        docker_client=None,
        fence_settle_s: float | None = None,
        drain_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, dict], None] | None = None,
        state_dir: Path | str | None = None,
        gpu_locks: GpuLocks | None = None,
    ) -> None:
        self.backend = backend
        self.allocator = allocator
        self.node = node
        self.docker_url = docker_url
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.docker = docker_client
        self.fence_settle_s = fence_settle_s if fence_settle_s is not None else heartbeat_ttl_s
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.on_event = on_event
        self._published: str | None = None
        self._draining_since: dict[str, float] = {}
        self._known_ids = (
            KnownClusterIds.in_state_dir(state_dir, namespace=allocator.keys.namespace, node=node)
            if state_dir is not None else KnownClusterIds()
        )
        self._unknown_seen: set[str] = set()  # running containers of unknown cluster ids, last listed
        self._busy_by_labels: set[str] = set()
        self._half_made: set[tuple[str, int, str]] = set()  # GPU instances without compute instance, last seen
        self._mig_modes: dict[str, tuple[bool, bool]] = {}  # GPU UUID -> (current, pending) MIG mode, last seen
        self._engine_was_down = False
        self._carves = (
            CarvesUnderWay.in_state_dir(state_dir, namespace=allocator.keys.namespace, node=node)
            if state_dir is not None else CarvesUnderWay()
        )
        # this agent's claim on the node and its GPUs (see `claim` and `serving`)
        self._claim = NodeClaim(allocator, node, ttl_s=heartbeat_ttl_s, gpus=self._gpu_uuids)
        self._gpu_locks = gpu_locks
        self._state_dir = state_dir
        self._locking = 0  # `serving` blocks under way: the outermost one holds the GPU locks
        self._changing = 0  # layout changes under way (see `layout_change`)
        self._stop_signal: int | None = None
        self._stopped = threading.Event()  # `stop`: ends the waits of `serving`, `start` and `run`
        self._run_stop: threading.Event | None = None  # the stop event of the `run` under way, set by `stop` too
        self._stop_lock = threading.RLock()  # `terminate` takes it in a signal handler, maybe in a thread holding it

    @property
    def identity(self) -> dict:
        """Who this agent is in its claim on the node: id, host and pid (see `claim`)."""
        return self._claim.identity

    def _gpu_uuids(self) -> list[str]:
        return [g.uuid for g in self.backend.gpus()] if self.backend is not None else []

    def _node_claim(self) -> NodeClaim:
        self._claim.node, self._claim.ttl_s = self.node, self.heartbeat_ttl_s  # both may be set after __init__
        return self._claim

    def check_claim(self) -> None:
        """Raise unless this agent still holds its node (once it claimed it): called before each
        change it makes on the node, so an agent whose node another agent took (its claim lapsed
        while Redis did not answer) stops acting there. See `NodeClaim.check`."""
        self._claim.check()

    def _as_claimed(self) -> dict:
        """``node`` and ``agent`` (this agent's claim) for the allocator's writes on slices of this
        node: Redis refuses them once the node's claim is no longer this agent's (`NodeNotClaimed`)."""
        return {"node": self.node, "agent": self._claim.held_as()}

    @contextmanager
    def layout_change(self) -> Iterator[None]:
        """Around a change of a GPU's layout: a signal `terminate` handles meanwhile takes effect
        only once the change is done (or rolled back), never half way through it."""
        self.check_claim()
        self._changing += 1
        try:
            yield
        finally:
            self._changing -= 1
            if not self._changing and self._stop_signal is not None:
                log.warning("agent stopped (signal %d) after its layout change", self._stop_signal)
                raise SystemExit(0)

    def stop(self) -> None:
        """Stop this agent from any thread (a program that embeds it; the CLI's signal handler is
        `terminate`). `run` returns after the round under way, a layout change under way being done
        first; `start` and `serving(wait_for_redis=True)` waiting to try again raise `AgentStopped` at
        once, and a later `start` raises it before its first round. Each gives the node's claim back
        as it ends. A stopped agent stays stopped."""
        with self._stop_lock:
            self._stopped.set()
            if self._run_stop is not None:
                self._run_stop.set()

    def _raise_if_stopped(self) -> None:
        from prefect_mig.errors import AgentStopped

        if self._stopped.is_set():
            raise AgentStopped(node=self.node)

    def terminate(self, signum: int, frame=None) -> None:  # noqa: ANN001 - a signal handler
        """Signal handler (``prefect-mig agent`` installs it for SIGTERM and SIGINT): ends the
        process now (``SystemExit(0)``), or, while a layout change is under way (`layout_change`:
        the carve of an empty GPU, a desired layout, a repair), as soon as it is done or rolled back,
        so a stop never leaves a GPU half carved. It stops the agent (`stop`) too."""
        self.stop()
        if self._changing:
            log.warning("signal %d: the agent stops once the layout change under way is done", signum)
            self._stop_signal = signum
            return
        log.warning("agent stopped (signal %d)", signum)
        raise SystemExit(0)

    def inventory(self) -> tuple[list[dict], list[SliceRecord]]:
        """This node's GPUs and the MIG slices that are ready to lease (with a compute instance).

        A slice is busy when NVML shows processes on it or a running task container in this
        namespace on this node carries its MIG UUID in its labels, whatever its cluster id (so it
        stays out of service after Redis lost the lease, until that container ends)."""
        known = {g["uuid"]: g for g in self.allocator.gpus()}
        gpus, slices = [], []
        labelled: set[str] | None = None
        for gpu in self._read_gpus():
            if not gpu.mig_enabled:
                continue
            model = self.backend.gpu_model(gpu.index)
            instances = self.backend.instances(gpu.index)
            running = self.backend.processes(gpu.index)
            labelled = self._labelled_busy() if labelled is None else labelled
            layout = " + ".join(str(m) for m in instances)
            before = known.get(gpu.uuid, {})
            generation = int(before.get("generation", 0)) + (before.get("layout") != layout)
            gpus.append(
                {"uuid": gpu.uuid, "index": gpu.index, "gpu_model": model.name, "layout": layout, "generation": generation}
            )
            for m in instances:
                if not m.mig_uuid:
                    continue
                slices.append(
                    slice_record(
                        model, m.profile, m.start,
                        node=self.node, gpu_uuid=gpu.uuid, gpu_index=gpu.index,
                        gpu_instance_id=m.gpu_instance_id, mig_uuid=m.mig_uuid,
                        generation=generation, busy=bool(running.get(m.mig_uuid)) or m.mig_uuid in labelled,
                    )
                )
        return gpus, slices

    def _read_gpus(self) -> list:
        """This node's GPUs (`GpuBackend.gpus`); a GPU with MIG off or whose MIG mode change awaits
        a reset is named with what to do once per change of its (current, pending) modes, whatever
        the agent does; a GPU without MIG at all is named once, with no fix to try."""
        gpus = self.backend.gpus()
        for gpu in gpus:
            modes = (gpu.mig_enabled, gpu.mig_pending)
            if self._mig_modes.get(gpu.uuid) != modes:
                self._mig_modes[gpu.uuid] = modes
                if not gpu.mig_supported:
                    log.info("GPU %d (%s, %s) has no MIG, so the agent serves nothing there", gpu.index,
                             gpu.device_name, gpu.uuid)
                elif gpu.mig_enabled != gpu.mig_pending or not gpu.mig_enabled:
                    _warn_mig_mode(gpu)
        return gpus

    def carve_empty(self, configs, name: str) -> list[str]:
        """Carve each GPU that has MIG on and no instances to layout config `name` of `configs`
        (a `LayoutConfigs`), and finish such a carve that was cut short. Returns what it carved.

        A carve killed half way (SIGKILL between two creates) leaves part of the layout, which
        would otherwise stay so for good. So each carve is recorded in the state dir before it
        starts and forgotten once done, and a GPU with a record is completed to the recorded layout
        when its instances are all part of it and all idle (no lease, no quarantine, no process,
        no task container on them): only what is missing is created, nothing is destroyed. Without
        a state dir the same is done for a GPU whose instances are part of config `name`'s layout
        for it, all idle. Any other GPU with instances (a layout carved on purpose, the
        repartitioner's) is left as it is."""
        carved = []
        for gpu in self._read_gpus():
            if not gpu.mig_enabled:
                continue
            model = self.backend.gpu_model(gpu.index)
            current = self.backend.instances(gpu.index)
            layout = configs.layout_for(name, gpu_model=model.name, node=self.node, gpu_index=gpu.index)
            if current:
                layout = self._carve_to_finish(gpu, model, current, layout)
            elif layout is None:
                log.info("GPU %d (%s) has no instances and config %r has no entry for it", gpu.index, model.name, name)
            if layout is None:
                continue
            with self.layout_change():
                self._carves.begin(gpu.uuid, str(layout))
                self.backend.apply_layout(gpu.index, layout, before_step=self.check_claim)  # keeps what is in place
                self._carves.done(gpu.uuid)
            what = "finished carving" if current else "carved"
            log.info("%s GPU %d (%s) to %s: %s", what, gpu.index, model.name, name, layout)
            carved.append(f"GPU {gpu.index} ({model.name}): {layout}" + (" (finished a carve cut short)" if current else ""))
        return carved

    def _carve_to_finish(self, gpu, model, current, default):
        """The layout to complete GPU `gpu` (with instances `current`) to, when it is a carve of an
        empty GPU cut short (see `carve_empty`); else None."""
        from prefect_mig.errors import PrefectMigError
        from prefect_mig.model import Layout

        recorded = self._carves.get(gpu.uuid)
        target = default if self._carves.path is None else None
        if recorded is not None:
            try:
                target = Layout.parse(model.name, recorded).validate_on(model)
            except PrefectMigError as exc:
                log.warning("GPU %d: the recorded carve %r is no layout of %s (%s); forgotten", gpu.index, recorded, model.name, exc)
                self._carves.done(gpu.uuid)
                return None
        have = {m.placement for m in current}
        if target is None or not have < set(target.instances):
            if recorded is not None:  # done (killed before forgetting it), or re-carved since
                self._carves.done(gpu.uuid)
            return None
        in_use = self._in_use(gpu.index, current)
        if in_use:
            log.warning("GPU %d (%s) is carved in part (%s of %s) but %s is in use: left as it is", gpu.index,
                        model.name, " + ".join(map(str, current)), target, ", ".join(in_use))
            return None
        return target

    def _in_use(self, index: int, instances) -> list[str]:
        """Those of the GPU's `instances` that are leased or quarantined in Redis, have processes,
        or carry a running task container."""
        states = self.allocator.slice_states([m.mig_uuid for m in instances if m.mig_uuid])
        running, labelled = self.backend.processes(index), self._labelled_busy()
        return [
            str(m) for m in instances if m.mig_uuid and (
                states[m.mig_uuid].startswith(("leased", "quarantined"))
                or running.get(m.mig_uuid) or m.mig_uuid in labelled
            )
        ]

    def publish(self) -> tuple[int, int, int]:
        """Publish the whole inventory now: (published, removed, handed to waiters). The models
        of GPUs outside the catalog, built from NVML, go first, so every process that sees their
        slices can look them up."""
        self.check_claim()
        gpus, slices = self.inventory()
        self.allocator.publish_models([self.backend.gpu_model(g["index"]) for g in gpus])
        result = self.allocator.publish(
            self.node, gpus, slices, docker_url=self.docker_url, heartbeat_ttl_s=self.heartbeat_ttl_s,
            fence_settle_s=self.fence_settle_s if self.docker is not None else None,
            agent=self._claim.held_as(),
        )
        self._published = self._signature(slices)
        return result

    def _publish_if_changed(self) -> bool:
        """Publish if the inventory (slices, busy flags) changed since the last publish."""
        _, slices = self.inventory()
        if self._signature(slices) == self._published:
            return False
        self.publish()
        return True

    @staticmethod
    def _signature(slices: list[SliceRecord]) -> str:
        return json.dumps([(s.id, s.busy) for s in slices])

    def repair(self) -> list[str]:
        """Give each GPU instance left without a compute instance (an agent killed between the two
        creates, another tool) its compute instance back, so its slice comes back into service;
        until then it has no MIG UUID and is never published. Only one already half-made at the
        previous call is repaired, so a create under way in another process is not raced. Returns
        what it repaired; one that cannot be repaired now is logged and tried again next time."""
        from prefect_mig.errors import PrefectMigError

        repaired, seen = [], set()
        for gpu in self.backend.gpus():
            if not gpu.mig_enabled:
                continue
            half = {(gpu.uuid, m.gpu_instance_id, str(m)) for m in self.backend.instances(gpu.index) if not m.mig_uuid}
            seen |= half
            if not half & self._half_made:
                continue
            try:
                with self.layout_change():
                    _, created = self.backend.apply_layout(gpu.index, self.backend.layout(gpu.index), before_step=self.check_claim)
            except CLAIM_LOST:
                raise
            except PrefectMigError as exc:
                log.warning("GPU %d has a GPU instance without compute instance and repairing it failed: %s", gpu.index, exc)
                continue
            log.warning("GPU %d: gave %s its compute instance back", gpu.index, ", ".join(map(str, created)))
            repaired.extend(f"GPU {gpu.index}: {m}" for m in created)
        self._half_made = seen
        return repaired

    def tick(self) -> str:
        """One round: repair half-made slices, republish if the layout changed, else heartbeat;
        then reap. Returns what it did (``engine down``: this node's Docker engine does not answer,
        so the node was taken out of service; its next heartbeat once the engine answers puts it
        back)."""
        self.check_claim()
        down = self._engine_down()
        if down is not None:
            self.allocator.node_down(self.node, why=down, agent=self._claim.held_as())
            self.reap()
            return "engine down"
        self.repair()
        if self._publish_if_changed():
            did = "published"
        else:
            did = self.allocator.heartbeat(self.node, ttl_s=self.heartbeat_ttl_s, agent=self._claim.held_as())
            if did == "unknown":
                self.publish()
                did = "published"
        self.reap()
        if self.docker is not None:
            import docker.errors
            import requests.exceptions

            try:
                pending = self.allocator.awaiting_fence(self.node)  # read before the containers are listed
                if self.fence_containers():
                    self._publish_if_changed()  # the slices they used are no longer busy by labels
                self.settle_quarantine(pending)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                log.warning("fencing skipped this round, the Docker engine failed: %s", exc)
        for gpu in self.backend.gpus():
            if gpu.mig_enabled and self.apply_desired(gpu.index, gpu.uuid) == "applied":
                did = "applied"
        return did

    def _engine_down(self) -> str | None:
        """Why this node's Docker engine cannot run task containers now, or None when it answers
        (or the agent was given no engine)."""
        if self.docker is None:
            return None
        import docker.errors
        import requests.exceptions

        try:
            self.docker.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            why = f"its Docker engine at {self.docker_url or 'the local socket'} does not answer ({exc.__class__.__name__})"
            if not self._engine_was_down:
                log.warning("node %s out of service: %s", self.node, why)
            self._engine_was_down = True
            return why
        if self._engine_was_down:
            log.warning("node %s: its Docker engine answers again", self.node)
        self._engine_was_down = False
        return None

    def apply_desired(self, index: int, gpu_uuid: str) -> str:
        """Apply the GPU's desired layout if there is one: ``none``, ``applied``, ``draining``,
        ``skipped`` or ``changed`` (see `finish_desired`)."""
        began = self.begin_desired(index, gpu_uuid)
        return self.finish_desired(index, gpu_uuid) if began == "ready" else began

    def begin_desired(self, index: int, gpu_uuid: str) -> str:
        """First half of applying a desired layout: take what goes out of service. Returns
        ``none`` (nothing desired), ``applied`` (already in place), ``draining`` (leases still
        run on a GPU being drained), ``skipped`` (a doomed slice got leased, or the drain timed
        out), or ``ready``: call `finish_desired` to re-carve. The simulator calls the two halves
        a reconfiguration time apart; `apply_desired` calls them back to back."""
        from prefect_mig.model import Layout

        self.check_claim()
        desired = self.allocator.desired(gpu_uuid)
        if desired is None:
            self._restore_stale(gpu_uuid, keep=())
            return "none"
        model = self.backend.gpu_model(index)
        target = Layout.parse(model.name, desired["layout"])
        current = self.backend.instances(index)
        doomed = [m for m in current if m.placement not in set(target.instances)]
        doomed_ids = [m.mig_uuid for m in doomed if m.mig_uuid]
        self._restore_stale(gpu_uuid, keep=doomed_ids)
        if {m.placement for m in current} == set(target.instances) and all(m.mig_uuid for m in current):
            self._clear_desired(gpu_uuid, desired, outcome="applied", detail="already in place")
            return "applied"
        if desired["kind"] == "drain":
            leased = self.allocator.withdraw_when_idle(doomed_ids, **self._as_claimed())
            started = self._draining_since.setdefault(gpu_uuid, self.clock())
            if leased:
                # the planner's timeout for this drain (scaled to the leases in its way), else ours
                timeout = desired.get("drain_timeout_s") or self.drain_timeout_s
                if self.clock() - started < timeout:
                    return "draining"
                self._draining_since.pop(gpu_uuid, None)
                self.allocator.restore(doomed_ids, **self._as_claimed())
                self._clear_desired(gpu_uuid, desired, outcome="skipped", detail=f"{leased} lease(s) outlived the drain")
                return "skipped"
        else:
            busy = self.allocator.withdraw(doomed_ids, **self._as_claimed())
            if busy is not None:
                self._clear_desired(gpu_uuid, desired, outcome="skipped", detail=f"slice {busy} is in use")
                return "skipped"
        return "ready"

    def _restore_stale(self, gpu_uuid: str, *, keep) -> None:
        """Put back into service the GPU's slices withdrawn for a re-carve that the desired layout
        no longer dooms: one replaced or cleared meanwhile (`layout apply`, a second repartitioner,
        this agent restarted between the two halves) would otherwise leave them out for good."""
        stale = sorted(set(self.allocator.withheld(gpu_uuid)) - set(keep))
        if stale:
            self.check_claim()
            log.warning("GPU %s: %d slice(s) withdrawn for a re-carve that is no longer desired go back into service: %s",
                        gpu_uuid, len(stale), ", ".join(stale))
            self.allocator.restore(stale, **self._as_claimed())

    def finish_desired(self, index: int, gpu_uuid: str) -> str:
        """Second half: re-carve through the backend (which checks NVML for processes first) and
        publish what NVML shows; on failure the withdrawn slices that still exist go back into
        service. Only slices withdrawn for this very layout are destroyed: if the desired layout
        changed since `begin_desired` (another writer), nothing is carved and ``changed`` is
        returned (the next tick begins it again). Returns ``applied``, ``skipped``, ``changed`` or
        ``none``."""
        from prefect_mig.errors import InstanceBusy, PrefectMigError
        from prefect_mig.model import Layout

        self.check_claim()
        desired = self.allocator.desired(gpu_uuid)
        if desired is None:
            return "none"
        target = Layout.parse(self.backend.gpu_model(index).name, desired["layout"])
        doomed_ids = [m.mig_uuid for m in self.backend.instances(index) if m.placement not in set(target.instances) and m.mig_uuid]
        withheld = self.allocator.withheld(gpu_uuid)
        if any(withheld.get(sid) != "withdrawn" for sid in doomed_ids):
            # The desired layout changed since `begin_desired` withdrew what the one before doomed:
            # destroying slices nobody withdrew could pull one from under a lease. Begin again.
            log.warning("GPU %s: its desired layout changed while being applied; it is begun again", gpu_uuid)
            return "changed"
        in_use = set(doomed_ids) & self._labelled_busy()
        if in_use:  # a task container (of any cluster id) runs on one, whatever NVML shows
            self.allocator.restore(doomed_ids, **self._as_claimed())
            self._clear_desired(gpu_uuid, desired, outcome="skipped",
                                detail=f"a task container runs on {', '.join(sorted(in_use))}")
            return "skipped"
        self._draining_since.pop(gpu_uuid, None)
        try:
            with self.layout_change():
                self.backend.apply_layout(index, target, before_step=self.check_claim)
            outcome, detail = "applied", desired["layout"]
        except CLAIM_LOST:
            raise  # the node is another agent's now: it neither restores nor publishes
        except (InstanceBusy, PrefectMigError) as exc:
            outcome, detail = "skipped", str(exc)
            self.allocator.restore(doomed_ids, **self._as_claimed())  # what still exists goes back into service
        finally:
            self.publish()  # what NVML shows now: new slices go to waiters, destroyed ones leave
        self._clear_desired(gpu_uuid, desired, outcome=outcome, detail=detail)
        return outcome

    def _clear_desired(self, gpu_uuid: str, desired: dict, *, outcome: str, detail: str = "") -> None:
        """Done with `desired` (as this agent read it): it goes unless a newer one replaced it meanwhile."""
        self.allocator.clear_desired(gpu_uuid, outcome=outcome, detail=detail, applied=desired, **self._as_claimed())
        self._tell(f"layout.{outcome}", {"gpu": gpu_uuid, "node": self.node, "detail": detail})

    def reap(self) -> None:
        """Sweep expired leases, abandoned requests and silent nodes; with `on_event`, also take
        the expiries and stale agents waiting to be announced and pass them on (each goes to one
        sweeping process only, see `Allocator.reap_announced`)."""
        if self.on_event is None:
            self.allocator.reap()
            return
        from prefect_mig.allocator.health import sweep_announced

        for kind, fields in sweep_announced(self.allocator):
            self._tell(kind, fields)

    def _tell(self, kind: str, fields: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, fields)
            except Exception as exc:  # noqa: BLE001 - a notification never stops the agent
                log.warning("on_event(%s) failed: %s", kind, exc)

    def _cluster_ids(self) -> list[str]:
        """The ids this agent's cluster had: Redis's now (the allocator puts its cached one back if
        Redis lost it) and earlier ones (remembered in the state dir, if any), so containers
        labelled before a change stay its own."""
        current = self.allocator.cluster_id()
        known = self._known_ids.ids
        if current not in known:
            if known:
                log.warning("cluster id changed in Redis (%s -> %s): Redis lost its data?", known[-1], current)
            self._known_ids.add(current)
        return list(self._known_ids.ids)

    def _node_containers(self, *, running_only: bool = False) -> tuple[list, list]:
        """This node's task containers in this namespace: (this cluster's, those of cluster ids
        this agent does not know). A container is this node's if its labels name this node or one
        of this node's MIG devices: one started before the node was renamed runs on its GPUs too."""
        from prefect_mig.launchers.docker import LABEL_PREFIX, task_containers

        known = set(self._cluster_ids())
        listed = task_containers(self.docker, cluster_id=None, namespace=self.allocator.keys.namespace, running_only=running_only)
        devices = self._mig_uuids()
        every = [
            c for c in listed
            if c.labels.get(f"{LABEL_PREFIX}node") == self.node or c.labels.get(f"{LABEL_PREFIX}mig-uuid") in devices
        ]
        own = [c for c in every if c.labels.get(f"{LABEL_PREFIX}cluster") in known]
        return own, [c for c in every if c.labels.get(f"{LABEL_PREFIX}cluster") not in known]

    def _mig_uuids(self) -> set[str]:
        """The MIG devices of this node's GPUs, as NVML shows them now (none without a backend)."""
        if self.backend is None:
            return set()
        return {m.mig_uuid for g in self.backend.gpus() if g.mig_enabled for m in self.backend.instances(g.index) if m.mig_uuid}

    def own_containers(self, *, running_only: bool = False) -> list:
        """This node's task containers of this cluster (never another cluster's on the same engine)."""
        return self._node_containers(running_only=running_only)[0]

    def _labelled_busy(self) -> set[str]:
        """MIG UUIDs that a running task container in this namespace on this node uses (by its
        labels), of this cluster or not: busy whatever NVML says. Containers of a cluster id this
        agent does not know are logged when first seen, never removed. If the engine does not
        answer, the last answer stands."""
        import docker.errors
        import requests.exceptions

        from prefect_mig.launchers.docker import LABEL_PREFIX

        if self.docker is None:
            return set()
        try:
            own, unknown = self._node_containers(running_only=True)
            self._warn_unknown(unknown)
            self._busy_by_labels = {c.labels.get(f"{LABEL_PREFIX}mig-uuid", "") for c in own + unknown} - {""}
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not list task containers (%s); keeping the last %d busy slice(s)", exc, len(self._busy_by_labels))
        return self._busy_by_labels

    def _warn_unknown(self, unknown: list) -> None:
        from prefect_mig.launchers.docker import LABEL_PREFIX

        new = [c for c in unknown if c.id not in self._unknown_seen]
        self._unknown_seen = {c.id for c in unknown}
        if new:
            log.warning(
                "task container(s) %s in namespace %s on node %s carry cluster id(s) %s, not this cluster's (%s): "
                "another cluster on this engine, or this cluster's from before Redis lost its data (an agent "
                "without its state dir cannot tell). Not removing them; their slices (%s) stay out of service "
                "while they run",
                ", ".join(c.short_id for c in new), self.allocator.keys.namespace, self.node,
                ", ".join(sorted({c.labels.get(f"{LABEL_PREFIX}cluster", "?") for c in new})),
                ", ".join(self._known_ids.ids),
                ", ".join(sorted({c.labels.get(f"{LABEL_PREFIX}mig-uuid", "?") for c in new})),
            )

    def fence_containers(self) -> list[str]:
        """Stop and remove this node's task containers (of this cluster only) whose lease no longer
        exists or has another fencing token; returns their ids. Containers of live leases are left
        alone; each removal is logged with the lease id, fence and reason. One the engine refuses to
        remove (an error reply, such as a root filesystem it cannot delete) is logged and left, its
        slice quarantined, and the others are fenced all the same; an engine that does not answer
        ends the pass."""
        import docker.errors

        from prefect_mig.launchers.docker import LABEL_PREFIX

        fenced = []
        for container in self.own_containers():
            try:
                if self.fence(container):
                    fenced.append(container.id)
            except docker.errors.APIError as exc:
                log.warning("could not remove task container %s of lease %s on %s (%s); tried again next round, "
                            "its slice is not settled meanwhile", container.short_id,
                            container.labels.get(f"{LABEL_PREFIX}lease-id", "?"),
                            container.labels.get(f"{LABEL_PREFIX}mig-uuid", "?"), exc)
        return fenced

    def settle_quarantine(self, pending: dict[str, tuple[str, str]]) -> list[str]:
        """Tell the allocator which of `pending` (`Allocator.awaiting_fence`, read before this
        round's fencing) no task container in this namespace on this node (of this cluster or of a
        cluster id it does not know) uses any more, by its MIG UUID or expired lease id label: they
        leave quarantine and go to waiters. Call it right after
        `fence_containers`; a slice whose container could not be removed stays quarantined (until
        it is, or the fallback settle time). Returns the slice ids settled."""
        from prefect_mig.launchers.docker import LABEL_PREFIX

        if not pending:
            return []
        in_use = set()
        own, unknown = self._node_containers()
        for c in own + unknown:
            in_use |= {c.labels.get(f"{LABEL_PREFIX}mig-uuid", ""), c.labels.get(f"{LABEL_PREFIX}lease-id", "")}
        confirmed = {sid: lease for sid, (lease, mig) in pending.items() if not {lease, mig} & in_use}
        self.allocator.settle_fenced(self.node, confirmed, agent=self._claim.held_as())
        return sorted(confirmed)

    def fence(self, container) -> bool:
        """Remove one task container if its lease is gone, its fence stale, or its lease revoked
        longer than the cluster's grace ago (then the lease is released once the container is gone,
        so the revoking request need not wait for the lease to expire); True if removed now. A
        container that vanished meanwhile (or whose removal is under way) is fine."""
        import docker.errors

        from prefect_mig.errors import LeaseLost
        from prefect_mig.launchers.docker import LABEL_PREFIX

        labels = container.labels
        lease_id, fence = labels.get(f"{LABEL_PREFIX}lease-id", ""), labels.get(f"{LABEL_PREFIX}fence", "")
        overdue = False
        try:
            current = str(self.allocator.lease(lease_id).fence)
            reason = None if current == fence else f"fence {fence} is stale (the lease's is {current})"
            if reason is None and self.allocator.revocation_overdue(lease_id):
                overdue, reason = True, "its lease was revoked and the holder did not stop within the grace"
        except LeaseLost as exc:
            reason = f"the lease is {exc.reason} (released, expired or never granted here)"
        if reason is None:
            return False
        removed = True
        try:
            container.remove(force=True, v=True)  # v: with its runtime volume
        except docker.errors.NotFound:
            removed = False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # someone else's removal is under way
                return False
            raise
        if removed:
            log.warning(
                "removed task container %s of lease %s fence %s on %s: %s",
                container.short_id, lease_id, fence, labels.get(f"{LABEL_PREFIX}mig-uuid", "?"), reason,
            )
            self.allocator.record_event(
                "container.fenced", node=self.node, lease=lease_id, fence=fence, container=container.short_id, reason=reason
            )
        if overdue:  # the holder's container is confirmed gone: the slice may go to the revoking request
            from prefect_mig.errors import LeaseNotOwned

            self.check_claim()
            try:
                self.allocator.release(lease_id, int(fence))
                log.warning("released revoked lease %s fence %s for the request that revoked it", lease_id, fence)
            except (LeaseLost, LeaseNotOwned):
                pass  # released or re-granted meanwhile
        return removed

    def claim(self) -> None:
        """Claim this node and its GPUs for this agent, or renew the claim, for `heartbeat_ttl_s`:
        one agent per node and per GPU, since two would apply one GPU's layout changes at once
        (destroying slices leased meanwhile) and publish over each other. The claim of an agent
        that died on this host (its pid is gone) is taken over at once; another host's lapses
        after its TTL. `serving` keeps it renewed however long a round takes.

        Raises:
            NodeTaken: another agent holds the node or one of its GPUs and may be alive (names
                what, its node, host and pid).
        """
        self._node_claim().take()

    @contextmanager
    def serving(self, *, wait_for_redis: bool = False, interval_s: float = 5.0,
                max_backoff_s: float = 60.0) -> Iterator[None]:
        """Hold this node for the block: lock its GPUs on this host (`gpu_locks`, which may raise
        `GpuHeld` naming the process that serves them), claim it (`claim`, which may raise `NodeTaken`) and renew the
        claim every third of the heartbeat TTL from a thread, so a round that outlasts the TTL (a
        slow carve on real NVML) does not let it lapse; if a renewal finds another agent holding it,
        this agent's next change on the node raises `NodeTaken` instead. On a clean exit (or a stop
        signal, `terminate`, or `stop`, even one that lands while the claim is being won) the claim
        is given back, if it is still this agent's, so an agent on another host can take the node at
        once; after a crash it lapses after the TTL. `run` serves for its whole loop.

        With `wait_for_redis`, an agent whose first claim finds Redis not answering (started before
        redis-server) waits for it, trying again after `run`'s backoff, and changes nothing on the
        node before it holds the claim; a stop signal meanwhile ends it (`terminate`: ``SystemExit``),
        and so does `stop` from another thread (`AgentStopped`, raised at once, the block not run)."""
        first = (lambda: self._claim_once_redis_answers(interval_s, max_backoff_s)) if wait_for_redis else None
        with self._holding_gpus(), self._node_claim().kept(first=first):
            yield

    def _claim_once_redis_answers(self, interval_s: float, max_backoff_s: float) -> None:
        from prefect_mig.errors import RedisUnavailable

        self._retrying(
            lambda retried: self._node_claim().take(), (RedisUnavailable,),
            "the agent waits for Redis, changing nothing on the node until it holds its claim (%s)",
            "Redis answers; the agent claimed the node", interval_s=interval_s, max_backoff_s=max_backoff_s,
        )
        self._raise_if_stopped()  # stopped while its claim was on the way: `kept` gives it back

    def _retrying(self, step: Callable[[bool], T], errors: tuple[type[Exception], ...], why: str, recovered: str, *,
                  interval_s: float, max_backoff_s: float) -> T:
        """``step(retried)`` until it returns, what it returns: after each of `errors` it raises, log
        "node <node>: `why` % error, retrying in <pause> s" and wait (`_pause_after`: `stop` ends the
        wait, raising `AgentStopped`); once a retried step returns, log "node <node>: `recovered`".
        Any other error is raised as it is."""
        failures = 0
        while True:
            try:
                result = step(failures > 0)
            except errors as exc:
                failures += 1
                self._pause_after(failures, interval_s, max_backoff_s, why, exc)
                continue
            if failures:
                log.warning("node %s: " + recovered, self.node)
            return result

    def _backoff(self, failures: int, interval_s: float, max_backoff_s: float) -> float:
        """The pause after `failures` failed rounds in a row: doubling from `interval_s` up to
        `max_backoff_s`, never past a third of the heartbeat TTL, so the node heartbeats again soon."""
        return min(interval_s * 2 ** (failures - 1), max_backoff_s, max(interval_s, self.heartbeat_ttl_s / 3))

    def _pause_after(self, failures: int, interval_s: float, max_backoff_s: float, why: str, *args) -> None:
        """Log "node <node>: `why` % `args`, retrying in <pause> s" and wait that `_backoff`; `stop`
        (or a stop signal, `terminate`) ends the wait at once, raising `AgentStopped`."""
        pause = self._backoff(failures, interval_s, max_backoff_s)
        log.warning("node %s: " + why + ", retrying in %.1f s", self.node, *args, pause)
        self._stopped.wait(pause)
        self._raise_if_stopped()

    @contextmanager
    def _holding_gpus(self) -> Iterator[None]:
        if self._locking:
            self._locking += 1
            try:
                yield
            finally:
                self._locking -= 1
            return
        locks = self._gpu_locks
        if locks is None:
            locks = self._gpu_locks = GpuLocks.for_backend(
                self.backend, what="node agent", gpu_lock_dir=os.environ.get("PREFECT_MIG_GPU_LOCK_DIR") or None,
                about={"namespace": self.allocator.keys.namespace, "node": self.node,
                       "state_dir": str(self._state_dir) if self._state_dir is not None else None},
            )
        missing = sorted(set(self._gpu_uuids()) - set(locks.gpus))
        if missing:
            raise ValueError(f"gpu_locks does not lock GPU(s) {', '.join(missing)} of node {self.node}")
        self._locking = 1
        try:
            if locks.held:  # this process's, held since before this agent (the demo's)
                yield
            else:
                with locks:
                    yield
        finally:
            self._locking = 0

    def run(self, *, interval_s: float = 5.0, stop: threading.Event | None = None, max_backoff_s: float = 60.0) -> None:
        """Serve the node (`serving`) and tick, every `interval_s`, until `stop` is set or the
        agent is stopped (`stop()`, which sets `stop` too); then it returns, the claim given back.

        A failing tick (Redis or the Docker engine down, a container gone) is logged and retried
        after a backoff that doubles up to `max_backoff_s`, but never past a third of the heartbeat
        TTL, so the node heartbeats again as soon as Redis answers. Only `NodeTaken` ends the loop:
        another agent serves this node.
        """
        stop = stop or threading.Event()
        with self._stop_lock:
            self._run_stop = stop
            if self._stopped.is_set():
                stop.set()
        try:
            self._run(stop, interval_s, max_backoff_s)
        finally:
            with self._stop_lock:
                self._run_stop = None

    def _run(self, stop: threading.Event, interval_s: float, max_backoff_s: float) -> None:
        failures = 0
        with self.serving():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.claim()
                    self.tick()
                    failures = 0
                    pause = interval_s - (time.monotonic() - started)
                except NodeTaken:
                    raise
                except NodeNotClaimed as refused:
                    self._claim_again_after(refused)
                    pause = 0.0
                except Exception as exc:  # noqa: BLE001 - the agent outlives whatever one round hits
                    failures += 1
                    pause = self._backoff(failures, interval_s, max_backoff_s)
                    log.warning("agent tick failed (%d in a row), retrying in %.1f s: %s", failures, pause, exc,
                                exc_info=failures == 1)
                stop.wait(max(0.0, pause))

    def start(self, configs=None, name: str | None = None, *, retry: bool = True, interval_s: float = 5.0,
              max_backoff_s: float = 60.0) -> tuple[list[str], tuple[int, int, int]]:
        """The agent's first round, inside `serving`: carve the empty GPUs to layout config `name`
        of `configs` (`carve_empty`; none without `configs`), then publish. Returns (what it
        carved, what `publish` returned).

        With `retry`, a round cut short because the claim lapsed (Redis did not answer for a TTL,
        mid-carve perhaps: the carve stops there, recorded) or Redis did not answer is tried again
        after a backoff as `run`'s: it claims the node again (carving nothing before), finishes the
        carve and publishes. Only `NodeTaken` (another agent holds the node now) ends it; anything
        else (a bad layout config, an NVML error) is raised as it is, as without `retry`.

        Raises:
            AgentStopped: the agent was stopped (`stop`, from another thread) before this round or
                while it waited to try again: it returns at once, changing nothing more on the node.
        """
        from prefect_mig.errors import RedisUnavailable

        self._raise_if_stopped()
        return self._retrying(
            lambda retried: self._first_round(configs, name, retried),
            (NodeClaimLapsed, NodeNotClaimed, RedisUnavailable) if retry else (),
            "the agent's start was cut short (%s); it changes nothing on the node until it has claimed it again",
            "the agent claimed the node again and carries on", interval_s=interval_s, max_backoff_s=max_backoff_s,
        )

    def _first_round(self, configs, name: str | None, retried: bool) -> tuple[list[str], tuple[int, int, int]]:
        try:
            if retried:
                self.claim()
            carved = self.carve_empty(configs, name) if configs is not None else []
            return carved, self.publish()
        except NodeTaken as taken:
            if retried:
                log.error("node %s: another agent holds it now (pid %s on host %s); this agent stops serving it",
                          self.node, taken.pid, taken.host)
            raise

    def _claim_again_after(self, refused: NodeNotClaimed) -> None:
        """Redis refused a write of this round: the claim had lapsed when it landed. Claim the node
        again; if another agent holds it now, say so in one line and stop (`NodeTaken`)."""
        try:
            self.claim()
        except NodeTaken as taken:
            log.error("node %s: another agent holds it now (pid %s on host %s), so Redis refused this agent's write "
                      "(%s); this agent stops serving it", self.node, taken.pid, taken.host, refused.action)
            raise taken from None
        log.warning("node %s: this agent's claim had lapsed when its write reached Redis (%s); it claimed the node "
                    "again", self.node, refused.action)


class CarvesUnderWay:
    """The carves of empty GPUs a node agent began and has not finished (GPU UUID -> layout), so a
    restarted agent finishes one that was cut short (see `NodeAgent.carve_empty`). Kept in
    ``<state_dir>/agent/carving/<namespace>@<node>.json`` (both names percent-quoted; the
    directories 0700, the file 0600); without a state dir (`path` None) nothing is recorded. A
    file that cannot be read or written is logged, and the carve goes on unrecorded.

    Examples:
        ```python
        import tempfile
        from prefect_mig.agent import CarvesUnderWay

        state = tempfile.mkdtemp()
        CarvesUnderWay.in_state_dir(state, namespace="prod", node="node-a").begin("GPU-1", "2g.12gb@0")
        carves = CarvesUnderWay.in_state_dir(state, namespace="prod", node="node-a")
        assert carves.get("GPU-1") == "2g.12gb@0"
        carves.done("GPU-1")
        assert CarvesUnderWay.in_state_dir(state, namespace="prod", node="node-a").get("GPU-1") is None
        ```
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._carves: dict[str, str] = self._load()

    @classmethod
    def in_state_dir(cls, state_dir: Path | str, *, namespace: str, node: str) -> CarvesUnderWay:
        return cls(Path(state_dir) / "agent" / "carving" / f"{quote(namespace, safe='')}@{quote(node, safe='')}.json")

    def get(self, gpu_uuid: str) -> str | None:
        return self._carves.get(gpu_uuid)

    def begin(self, gpu_uuid: str, layout: str) -> None:
        self._carves[gpu_uuid] = layout
        self._write()

    def done(self, gpu_uuid: str) -> None:
        if self._carves.pop(gpu_uuid, None) is not None:
            self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            private_dir(self.path.parent)
            write_private(self.path, json.dumps(self._carves))
        except OSError as exc:
            log.warning("could not record the carves under way in %s (%s): one cut short is not finished", self.path, exc)

    def _load(self) -> dict[str, str]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            carves = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("could not read the carves under way from %s (%s); starting with none", self.path, exc)
            return {}
        if not (isinstance(carves, dict) and all(isinstance(v, str) for v in carves.values())):
            log.warning("%s does not hold carves under way; starting with none", self.path)
            return {}
        return carves


def _warn_mig_mode(gpu) -> None:
    """MIG is off, or a change of MIG mode waits for a GPU reset (A100/A30): say so, with what to do."""
    name = f"GPU {gpu.index} ({gpu.device_name}, {gpu.uuid})"
    if not (gpu.mig_enabled or gpu.mig_pending):
        log.warning("%s: MIG mode is off (current and pending), so the agent serves no slices there; to serve it, "
                    "turn MIG on with sudo nvidia-smi -i %d -mig 1 (an A100/A30 then also needs a GPU reset: "
                    "sudo nvidia-smi -i %d -r, with nothing running on it, or a reboot); see `prefect-mig doctor`",
                    name, gpu.index, gpu.index)
    elif gpu.mig_pending:
        log.warning("%s: MIG mode is off, pending on (it goes on at the next GPU reset), so the agent carves nothing "
                    "there and it serves no slices; reset the GPU (sudo nvidia-smi -i %d -r, with nothing running on it) "
                    "or reboot, then start the agent again; see `prefect-mig doctor`", name, gpu.index)
    else:
        log.warning("%s: MIG mode is on, pending off: MIG goes off at the next GPU reset, and its slices with it; "
                    "undo with sudo nvidia-smi -i %d -mig 1; see `prefect-mig doctor`", name, gpu.index)
