"""Fleet specs: which nodes have which GPU models, as one string.

``node-a=2xH100-80GB,node-b=1xA30-24GB`` means node ``node-a`` has two H100-80GB and ``node-b`` one
A30-24GB. The simulated NVML builds its hardware from such a spec; the simulator and the demo too.

Examples:
    ```python
    from prefect_mig.model import FleetSpec

    fleet = FleetSpec.parse("node-a=2xH100-80GB,node-b=A30-24GB")
    assert fleet.gpu_models("node-a") == ["H100-80GB", "H100-80GB"]
    assert str(fleet) == "node-a=2xH100-80GB,node-b=1xA30-24GB"
    ```
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from prefect_mig.errors import InvalidFleetSpec
from prefect_mig.model.catalog import catalog

_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_GROUP = re.compile(r"^(?:(?P<count>\d+)\s*[xX*]\s*)?(?P<model>[A-Za-z0-9-]+)$")


class NodeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gpus: tuple[str, ...]


class FleetSpec(BaseModel):
    """Nodes and their GPU models, in order (GPU index = position on the node)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: tuple[NodeSpec, ...]

    @classmethod
    def parse(cls, text: str, *, field: str = "simulated_fleet") -> FleetSpec:
        """Read ``node=[N x]MODEL[+[N x]MODEL...][,node=...]``.

        Raises:
            InvalidFleetSpec: the text does not parse, a node repeats, or a count is out of range.
            UnknownGpuModel: a model the catalog does not know (the message lists the known ones).
        """
        nodes: list[NodeSpec] = []
        seen: set[str] = set()
        text = str(text).strip()
        example = "e.g. 'node-a=2xH100-80GB,node-b=1xA30-24GB'"
        if not text:
            raise InvalidFleetSpec(f"{field}: empty fleet spec; {example}.", field=field, value=text)
        for part in text.split(","):
            name, sep, gpus = part.strip().partition("=")
            name = name.strip()
            if not sep or not _NODE.match(name):
                raise InvalidFleetSpec(
                    f"{field}: cannot read node {part.strip()!r} in {text!r}; write "
                    f"'<node>=<count>x<GPU model>', {example}.",
                    field=field,
                    value=text,
                )
            if name in seen:
                raise InvalidFleetSpec(
                    f"{field}: node {name!r} appears twice in {text!r}.", field=field, value=text
                )
            seen.add(name)
            models: list[str] = []
            for group in gpus.split("+"):
                found = _GROUP.match(group.strip())
                if not found:
                    raise InvalidFleetSpec(
                        f"{field}: cannot read GPUs {group.strip()!r} of node {name!r}; {example}.",
                        field=field,
                        value=text,
                    )
                count = int(found["count"] or 1)
                if not 1 <= count <= 16:
                    raise InvalidFleetSpec(
                        f"{field}: node {name!r} asks for {count} GPUs of one model; allowed 1 to 16.",
                        field=field,
                        value=text,
                    )
                model = catalog().get(found["model"], field=field).name
                models.extend([model] * count)
            nodes.append(NodeSpec(name=name, gpus=tuple(models)))
        return cls(nodes=tuple(nodes))

    def __str__(self) -> str:
        parts = []
        for node in self.nodes:
            groups: list[list] = []
            for model in node.gpus:
                if groups and groups[-1][1] == model:
                    groups[-1][0] += 1
                else:
                    groups.append([1, model])
            parts.append(f"{node.name}=" + "+".join(f"{n}x{m}" for n, m in groups))
        return ",".join(parts)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def gpu_models(self, node: str) -> list[str]:
        for n in self.nodes:
            if n.name == node:
                return list(n.gpus)
        raise InvalidFleetSpec(
            f"node: {node!r} is not in the fleet; nodes: {', '.join(self.node_names)}.",
            field="node",
            value=node,
        )
