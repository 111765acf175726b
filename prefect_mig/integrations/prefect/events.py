"""Prefect events for Automations, emitted by the process that made the transition.

The task runner emits ``prefect-mig.lease.granted`` when its task got a slice, then
``prefect-mig.lease.released`` when the lease ended normally, ``prefect-mig.lease.revoked`` when a
higher-priority request revoked it while the task ran, or ``prefect-mig.lease.lost`` (expired,
fenced, gone) otherwise; ``prefect-mig agent`` emits ``prefect-mig.layout.applied|skipped`` for the
desired layouts it handles. Whichever agent or repartition service sweeps emits
``prefect-mig.lease.expired`` (once per lease, see `Allocator.reap_announced`) and
``prefect-mig.agent.stale`` when a node's heartbeat lapses (once per silence, resource
``prefect-mig.node.<name>``), then ``prefect-mig.agent.recovered`` when its agent heartbeats or
publishes again. Fences never appear (they are the holder's secret).

Every lease event has the slice as its resource, ``prefect-mig.slice.<node>/<gpu>/<profile>@<start>``
(labels: node, GPU index, profile, MIG UUID, lease id), and the task run, flow run and tenant as
related resources (roles ``task-run``, ``flow-run``, ``tenant``; the tenant's id is
``prefect-mig.tenant.<name>``), so an Automation can match ``prefect-mig.lease.revoked`` for one
tenant, or all lease events of one flow run.

Examples:
    ```python
    from prefect_mig.allocator.models import SliceRecord
    from prefect_mig.integrations.prefect.events import lease_resources

    s = SliceRecord(id="MIG-1", node="node-a", gpu_uuid="GPU-1", gpu_index=0, gpu_model="H100-80GB",
                    profile="1g.10gb", pkey="H100-80GB/1g.10gb", start=4, size=1, gpu_instance_id=9,
                    mig_uuid="MIG-1", compute_slices=1, memory_mib=9856)
    resource, related = lease_resources(s, lease_id="L1", tenant="team-a", task_run_id="t1", flow_run_id="f1")
    assert resource["prefect.resource.id"] == "prefect-mig.slice.node-a/0/1g.10gb@4"
    assert {r["prefect.resource.role"] for r in related} == {"task-run", "flow-run", "tenant"}
    ```
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from prefect_mig.allocator.models import SliceRecord

log = logging.getLogger("prefect_mig.events")

LEASE_EVENTS = ("granted", "released", "revoked", "expired", "lost")


def slice_resource_id(s: SliceRecord) -> str:
    return f"prefect-mig.slice.{s.node}/{s.gpu_index}/{s.profile}@{s.start}"


def lease_resources(
    s: SliceRecord, *, lease_id: str, tenant: str, task_run_id: Any = None, flow_run_id: Any = None
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The resource (the slice) and related resources (task run, flow run, tenant) of a lease event."""
    resource = {
        "prefect.resource.id": slice_resource_id(s),
        "prefect.resource.name": f"{s.profile}@{s.start} on {s.node} GPU {s.gpu_index}",
        "prefect-mig.node": s.node,
        "prefect-mig.gpu": str(s.gpu_index),
        "prefect-mig.profile": s.profile,
        "prefect-mig.mig-uuid": s.mig_uuid or "",
        "prefect-mig.lease-id": lease_id,
    }
    related = [{"prefect.resource.id": f"prefect-mig.tenant.{tenant}", "prefect.resource.role": "tenant",
                "prefect.resource.name": tenant}]
    if task_run_id:
        related.append({"prefect.resource.id": f"prefect.task-run.{task_run_id}", "prefect.resource.role": "task-run"})
    if flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"})
    return resource, related


def emit_lease_event(
    what: str,
    s: SliceRecord,
    *,
    lease_id: str,
    tenant: str,
    task_run_id: Any = None,
    flow_run_id: Any = None,
    payload: dict[str, Any] | None = None,
) -> None:
    """Emit ``prefect-mig.lease.<what>`` (one of `LEASE_EVENTS`). An event that cannot be sent is
    logged, never raised: the lease's life does not depend on the events API."""
    if what not in LEASE_EVENTS:
        raise ValueError(f"what={what!r}: must be one of {', '.join(LEASE_EVENTS)}")
    resource, related = lease_resources(s, lease_id=lease_id, tenant=tenant, task_run_id=task_run_id, flow_run_id=flow_run_id)
    _emit(f"prefect-mig.lease.{what}", resource, related, payload or {})


CLUSTER_EVENTS = ("layout.applied", "layout.skipped", "lease.expired", "agent.stale", "agent.recovered")


def emit_cluster_event(event_type: str, fields: dict[str, Any]) -> None:
    """Emit a Prefect event for a transition a cluster process (agent, repartition service) made or
    saw, one of `CLUSTER_EVENTS`; others are ignored.

    - ``layout.applied|skipped``: resource ``prefect-mig.gpu.<uuid>``, `fields` as payload.
    - ``lease.expired``: as the runner's lease events (resource the slice, related the tenant and,
      from the lease's holder ``<flow run>/<task run>``, the runs), from an announcement
      (`Allocator.reap_announced`); payload ``held_s``.
    - ``agent.stale`` / ``agent.recovered``: resource ``prefect-mig.node.<name>``; payload the node
      and, for ``stale``, ``heartbeat_age_s`` (seconds since its agent's last heartbeat), for
      ``recovered``, ``silent_ms`` (how long it was out of service).
    """
    if event_type not in CLUSTER_EVENTS:
        return
    contextvars.copy_context().run(_emit_cluster_event, event_type, fields)


def _emit_cluster_event(event_type: str, fields: dict[str, Any]) -> None:
    # Outside any run: Prefect's events worker relates an event to the flow and task run of the
    # context it was emitted in, and a cluster process may run inside one (the mig-repartition flow
    # sweeps expiries): an expired lease's flow run is its holder's, not the sweeper's.
    from prefect.context import FlowRunContext, TaskRunContext

    FlowRunContext.__var__.set(None)
    TaskRunContext.__var__.set(None)
    if event_type == "lease.expired":
        flow_run_id, _, task_run_id = str(fields.get("holder") or "").partition("/")
        s = SliceRecord.model_validate_json(fields["slice"])
        emit_lease_event(
            "expired", s, lease_id=str(fields.get("lease", "")), tenant=str(fields.get("tenant") or "default"),
            task_run_id=task_run_id or None, flow_run_id=flow_run_id if task_run_id else None,
            payload={"held_s": int(fields.get("held_ms") or 0) / 1000},
        )
    elif event_type.startswith("agent."):
        node = str(fields.get("node", ""))
        resource = {"prefect.resource.id": f"prefect-mig.node.{node}", "prefect.resource.name": node}
        _emit(f"prefect-mig.{event_type}", resource, [], dict(fields))
    else:
        gpu = str(fields.get("gpu", ""))
        _emit(f"prefect-mig.{event_type}", {"prefect.resource.id": f"prefect-mig.gpu.{gpu}"}, [], dict(fields))


#: Prefect events that end a flow run: the time between pipeline runs, when a re-carve costs nothing
FLOW_RUN_ENDS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                 "prefect.flow-run.Cancelled")


def watch_flow_run_ends(on_end: Callable[[str], None], stop: threading.Event) -> threading.Thread:
    """Call ``on_end(event name)`` for each flow run that ends (`FLOW_RUN_ENDS`), from Prefect's
    events websocket, in a daemon thread until `stop`. A Prefect API that is down or goes away is
    logged and retried every 30 s: the caller's interval still holds."""

    async def follow() -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(name=list(FLOW_RUN_ENDS)))) as events:
            async for event in events:
                if stop.is_set():
                    return
                on_end(event.event)

    def run() -> None:
        import asyncio

        while not stop.is_set():
            try:
                asyncio.run(follow())
            except Exception as exc:  # noqa: BLE001 - the interval is the fallback
                log.warning("not following flow runs' ends (retrying in 30 s): %s", exc)
            stop.wait(30)

    thread = threading.Thread(target=run, name="prefect-mig-flow-run-ends", daemon=True)
    thread.start()
    return thread


def _emit(name: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    try:
        emit_event(event=name, resource=resource, related=related, payload=payload)
    except Exception as exc:  # noqa: BLE001 - events are best effort; the lease is what matters
        log.warning("could not emit %s: %s", name, exc)
