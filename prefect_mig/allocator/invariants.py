"""Replay the events stream and check what the allocator promises.

- never two live leases on one slice;
- fencing tokens strictly increase, grant after grant;
- a grant to a queued request goes to the best-ordered waiter that accepts that slice kind
  (priority, FIFO, aging), unless a quota or node constraint excused it;
- every lease ends by release, expiry or revocation (or is still live at the end of the log);
- a slice quarantined because its holder's lease expired (``slice.quarantined``) is granted to
  nobody until it settles (``slice.settled``: its node's agent confirmed the holder's task
  container gone, or the fallback settle time passed).

A ``cluster.epoch`` event means Redis lost its state and the log restarted: leases of the old epoch
are gone from Redis (their holders learn it at renewal; nodes quarantine their slices meanwhile), so
the replay forgets them; `Report.epochs` counts the epochs seen (logs read before and after a wipe
can be replayed one after the other).

Examples:
    ```python
    from prefect_mig.allocator.invariants import check_events

    events = [
        {"type": "lease.granted", "lease": "a", "slice": "s1", "fence": "1"},
        {"type": "lease.released", "lease": "a", "slice": "s1", "fence": "1"},
    ]
    assert check_events(events).violations == []
    ```
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    grants: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    epochs: int = 0


def check_events(events: Iterable[dict[str, str]], *, excused_order: bool = False) -> Report:
    """Check the invariants over `events` (oldest first).

    Args:
        excused_order: skip the ordering check (for runs with quotas or node constraints, where a
            worse-ordered waiter may rightly go first).
    """
    report = Report()
    holder_of: dict[str, str] = {}  # slice -> live lease
    slice_of: dict[str, str] = {}  # live lease -> slice
    last_fence = 0
    waiting: dict[str, tuple[int, set[str]]] = {}  # request -> (order, pkeys)
    fencing: dict[str, str] = {}  # slice -> expired lease whose container is not confirmed gone
    for e in events:
        kind = e.get("type", "")
        if kind == "cluster.epoch":
            report.epochs += 1
            holder_of.clear()
            slice_of.clear()
            waiting.clear()
            fencing.clear()
        elif kind == "slice.quarantined":
            fencing[e["slice"]] = e.get("lease", "")
        elif kind == "slice.settled":
            fencing.pop(e["slice"], None)
        elif kind == "lease.queued":
            waiting[e["request"]] = (int(e["order"]), set(e.get("pkeys", "").split(",")))
        elif kind in ("lease.cancelled", "lease.abandoned"):
            waiting.pop(e["request"], None)
        elif kind == "lease.granted":
            report.grants += 1
            lease, sl, fence = e["lease"], e["slice"], int(e["fence"])
            if sl in holder_of:
                report.violations.append(f"slice {sl} granted to {lease} while {holder_of[sl]} holds it")
            if sl in fencing:
                report.violations.append(
                    f"slice {sl} granted to {lease} before the container of expired lease {fencing[sl]} was confirmed gone"
                )
            if fence <= last_fence:
                report.violations.append(f"fence {fence} for {lease} does not exceed {last_fence}")
            last_fence = max(last_fence, fence)
            mine = waiting.pop(lease, None)
            if mine is not None and not excused_order and e.get("pkey"):
                better = [r for r, (order, pkeys) in waiting.items() if e["pkey"] in pkeys and order < mine[0]]
                if better:
                    report.violations.append(
                        f"{lease} (order {mine[0]}) got {e['pkey']} while better-ordered {better[0]} waited"
                    )
            holder_of[sl] = lease
            slice_of[lease] = sl
        elif kind in ("lease.released", "lease.expired"):
            lease = e["lease"]
            sl = slice_of.pop(lease, None)
            if sl is None:
                report.violations.append(f"{kind} for {lease}, which was not live")
                continue
            if holder_of.get(sl) == lease:
                del holder_of[sl]
            report.ended[kind] = report.ended.get(kind, 0) + 1
    report.live = set(slice_of)
    return report
