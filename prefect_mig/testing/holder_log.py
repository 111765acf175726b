"""An overlap checker that does not trust the allocator: holders write down when they used a slice.

Every holder appends one record per use, ``(slice, fence, start, end)`` in wall-clock seconds, where
``start`` is when it began to use the slice (after its grant arrived) and ``end`` when it stopped
(``on_lost`` fired, it began to release, or it was killed). `overlaps` finds two records of one slice
whose times intersect: the allocator's one promise, checked without its events stream.

Examples:
    ```python
    from prefect_mig.testing.holder_log import HolderLog

    log = HolderLog()
    log.add("s1", 7, 0.0, 1.0)
    log.add("s1", 8, 1.0, 2.0)
    log.add("s1", 9, 1.5, 3.0)
    assert [(a.fence, b.fence) for a, b in log.overlaps()] == [(8, 9)]
    ```
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Use:
    slice: str
    fence: int
    start: float
    end: float


class HolderLog:
    """Uses of slices, from this process's threads or (with `path`) appended by other processes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._uses: list[Use] = []
        self._lock = threading.Lock()

    def add(self, slice_id: str, fence: int, start: float, end: float) -> None:
        use = Use(slice_id, int(fence), float(start), float(end))
        with self._lock:
            if self.path is None:
                self._uses.append(use)
            else:  # one short line per write: appends from many processes do not interleave
                with self.path.open("a") as f:
                    f.write(json.dumps(use.__dict__) + "\n")

    def uses(self) -> list[Use]:
        if self.path is None:
            return list(self._uses)
        if not self.path.exists():
            return []
        return [Use(**json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]

    def overlaps(self) -> list[tuple[Use, Use]]:
        """Pairs of uses of one slice whose [start, end] intervals intersect."""
        by_slice: dict[str, list[Use]] = {}
        for use in self.uses():
            by_slice.setdefault(use.slice, []).append(use)
        found = []
        for uses in by_slice.values():
            uses.sort(key=lambda u: u.start)
            latest = uses[0]
            for use in uses[1:]:
                if use.start < latest.end:
                    found.append((latest, use))
                if use.end > latest.end:
                    latest = use
        return found
