"""The cluster ids a node agent has seen for its namespace and node, kept in the state dir.

Task containers carry their cluster's id (kept in Redis) in their labels, and a node agent fences
only the containers of ids it knows. If Redis loses its data the id may change, and an agent that
restarts afterwards would no longer know the old one; so the ids it has seen are written to
``<state_dir>/agent/<namespace>@<node>.json`` (both names percent-quoted; the directory 0700, the
file 0600), newest last, at most `KEEP` of them. Without a state dir they live in memory only.

Examples:
    ```python
    import tempfile
    from prefect_mig.known_cluster_ids import KnownClusterIds

    state = tempfile.mkdtemp()
    ids = KnownClusterIds.in_state_dir(state, namespace="prod", node="node-a")
    assert ids.add("c1") and not ids.add("c1")
    assert KnownClusterIds.in_state_dir(state, namespace="prod", node="node-a").ids == ["c1"]
    ```
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import quote

from prefect_mig.state_dir import private_dir, write_private

log = logging.getLogger("prefect_mig.agent")

KEEP = 16  # ids remembered: one more each time Redis lost its data and a new id was made


class KnownClusterIds:
    """The ids seen, newest last, read from `path` (when given) and written back on each new one.

    A file that cannot be read or written is logged and the ids are kept in memory: the agent then
    cannot tell its own old containers from another cluster's, and keeps their slices out of
    service without removing them (see `NodeAgent`).

    Examples:
        ```python
        from prefect_mig.known_cluster_ids import KEEP, KnownClusterIds

        ids = KnownClusterIds()  # no state dir: in memory only
        for i in range(KEEP + 1):
            ids.add(f"id-{i}")
        assert ids.ids[0] == "id-1" and ids.ids[-1] == f"id-{KEEP}"
        ```
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.ids: list[str] = self._load()

    @classmethod
    def in_state_dir(cls, state_dir: Path | str, *, namespace: str, node: str) -> KnownClusterIds:
        name = f"{quote(namespace, safe='')}@{quote(node, safe='')}.json"
        return cls(Path(state_dir) / "agent" / name)

    def add(self, cluster_id: str) -> bool:
        """Remember `cluster_id` (dropping the oldest past `KEEP`); True if it was new."""
        if cluster_id in self.ids:
            return False
        self.ids = [*self.ids, cluster_id][-KEEP:]
        if self.path is not None:
            try:
                private_dir(self.path.parent)
                write_private(self.path, json.dumps(self.ids))
            except OSError as exc:
                log.warning("could not write the known cluster ids to %s (%s); kept in memory only", self.path, exc)
        return True

    def _load(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        try:
            ids = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("could not read the known cluster ids from %s (%s); starting with none", self.path, exc)
            return []
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            log.warning("%s does not hold a list of cluster ids; starting with none", self.path)
            return []
        return ids[-KEEP:]
