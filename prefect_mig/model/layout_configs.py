"""Declarative MIG layouts, as mig-parted does it: named configs in a YAML file, per GPU model and
optionally per node and GPU index, validated against the catalog with errors that name the line.

The file (the package ships ``default_layouts.yaml``; yours replaces it with ``-f`` or
``PREFECT_MIG_LAYOUTS_FILE``)::

    version: v1
    default: balanced              # the config the agent carves GPUs that have no instances to
    mig-configs:
      balanced:
        - gpu-models: [H100-80GB]  # optional filters: gpu-models, nodes, gpus (indices)
          mig-devices: {3g.40gb: 1, 2g.20gb: 1, 1g.10gb: 2}   # counts, placed automatically
      mine:
        - nodes: [node-a]
          gpus: [0]
          layout: "3g.40gb@4 + 1g.10gb@0 + 1g.10gb@1"         # or explicit placements

For each GPU the first entry of the config whose filters match gives its layout; a GPU no entry
matches is left alone.

Examples:
    ```python
    from prefect_mig.model.layout_configs import LayoutConfigs

    configs = LayoutConfigs.load()  # the shipped defaults
    layout = configs.layout_for("all-1g", gpu_model="H100-80GB", node="node-a", gpu_index=0)
    assert layout.profile_counts() == {"1g.10gb": 7}
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prefect_mig.errors import ConfigError, PrefectMigError
from prefect_mig.model.catalog import GpuModel, get_model
from prefect_mig.model.layout import Layout, Placement, _bits

_ENTRY_KEYS = {"gpu-models", "nodes", "gpus", "mig-devices", "layout"}


@dataclass(frozen=True)
class ConfigEntry:
    """One entry of a named config: which GPUs it is for, and their layout (counts or placements)."""

    line: int
    gpu_models: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    devices: tuple[tuple[str, int], ...] = ()
    layout: str | None = None

    def matches(self, *, gpu_model: str, node: str, gpu_index: int) -> bool:
        return (
            (not self.gpu_models or gpu_model in self.gpu_models)
            and (not self.nodes or node in self.nodes)
            and (not self.gpus or gpu_index in self.gpus)
        )


@dataclass(frozen=True)
class LayoutConfigs:
    """Named layout configs read from one YAML file (see the module docstring for its format)."""

    source: str
    default: str
    configs: Mapping[str, tuple[ConfigEntry, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LayoutConfigs:
        """Read `path`, or the shipped defaults when None.

        Raises:
            ConfigError: the file is missing, not YAML, or names what the catalog lacks (with its line).
        """
        if path is None:
            text = resources.files("prefect_mig.model").joinpath("default_layouts.yaml").read_text()
            return cls.parse(text, source="default_layouts.yaml (shipped)")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"layouts file {path}: cannot be read ({exc.strerror}).", field="layouts_file", value=str(path)) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"layouts file {path}: not UTF-8 text (byte {exc.start}); it must be a YAML file.",
                              field="layouts_file", value=str(path)) from exc
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "<layouts>") -> LayoutConfigs:
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).", field="layouts_file") from exc
        top = _mapping(root, source, "the file")
        for key, (_, node) in top.items():
            if key not in ("version", "default", "mig-configs"):
                _fail(source, node, f"unexpected key {key!r}; allowed: version, default, mig-configs")
        version = _scalar(top, "version", source, default="v1")
        if version != "v1":
            _fail(source, top["version"][1], f"version {version!r} is not supported; allowed: v1")
        if "mig-configs" not in top:
            _fail(source, root, "no 'mig-configs' mapping")
        configs = {
            name: tuple(_entry(item, source, name) for item in _sequence(node, source, f"mig-configs.{name}"))
            for name, (_, node) in _mapping(top["mig-configs"][1], source, "mig-configs").items()
        }
        default = _scalar(top, "default", source, default=next(iter(configs), ""))
        if default not in configs:
            _fail(source, top.get("default", (None, root))[1], f"default {default!r} is not a config here; allowed: {', '.join(configs)}")
        return cls(source=source, default=default, configs=configs)

    def names(self) -> list[str]:
        return list(self.configs)

    def layout_for(self, name: str, *, gpu_model: str, node: str, gpu_index: int) -> Layout | None:
        """The layout config `name` gives this GPU (None: no entry matches it).

        Raises:
            ConfigError: no config of that name (lists the names), or the entry does not fit this
                GPU model (names the line).
        """
        if name not in self.configs:
            raise ConfigError(
                f"layout config {name!r} is not in {self.source}; allowed: {', '.join(self.configs)}.",
                field="config",
                value=name,
            )
        for entry in self.configs[name]:
            if entry.matches(gpu_model=gpu_model, node=node, gpu_index=gpu_index):
                return _entry_layout(entry, get_model(gpu_model), self.source)
        return None


def _fail(source: str, node: Any, message: str) -> None:
    line = node.start_mark.line + 1 if node is not None else "?"
    raise ConfigError(f"{source}:{line}: {message}.", field="layouts_file")


def _mapping(node, source: str, what: str) -> dict[str, tuple[Any, Any]]:
    if not isinstance(node, yaml.MappingNode):
        _fail(source, node, f"{what} must be a mapping")
    found: dict[str, tuple[Any, Any]] = {}
    for k, v in node.value:
        name = str(k.value)
        if name in found:  # YAML loaders keep the last silently; a second config of one name is a mistake
            first = found[name][0].start_mark.line + 1
            _fail(source, k, f"{what}: {name!r} is given twice (first at line {first}); each key may appear once")
        found[name] = (k, v)
    return found


def _sequence(node, source: str, what: str) -> list:
    if not isinstance(node, yaml.SequenceNode):
        _fail(source, node, f"{what} must be a list of entries")
    return list(node.value)


def _scalar(mapping: dict, key: str, source: str, *, default: str) -> str:
    if key not in mapping:
        return default
    node = mapping[key][1]
    if not isinstance(node, yaml.ScalarNode):
        _fail(source, node, f"{key} must be a single value")
    return str(node.value)


def _names(node, source: str, what: str) -> tuple[str, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (str(node.value),)
    return tuple(str(v.value) for v in _sequence(node, source, what))


def _entry(node, source: str, name: str) -> ConfigEntry:
    where = f"mig-configs.{name}"
    fields = _mapping(node, source, f"an entry of {where}")
    for key, (k, _) in fields.items():
        if key not in _ENTRY_KEYS:
            _fail(source, k, f"{where}: unexpected key {key!r}; allowed: {', '.join(sorted(_ENTRY_KEYS))}")
    if ("mig-devices" in fields) == ("layout" in fields):
        _fail(source, node, f"{where}: an entry needs exactly one of 'mig-devices' (counts) and 'layout' (placements)")
    models = _names(fields["gpu-models"][1], source, "gpu-models") if "gpu-models" in fields else ()
    for model_name, item in zip(models, _items(fields.get("gpu-models"))):
        try:
            get_model(model_name, field="gpu-models")
        except ConfigError as exc:
            _fail(source, item, f"{where}.gpu-models: {exc}".rstrip("."))
    gpus: tuple[int, ...] = ()
    if "gpus" in fields:
        raw = _names(fields["gpus"][1], source, "gpus")
        if not all(g.isdigit() for g in raw):
            _fail(source, fields["gpus"][1], f"{where}.gpus: {list(raw)} must be GPU indices (0, 1, ...)")
        gpus = tuple(int(g) for g in raw)
    devices: tuple[tuple[str, int], ...] = ()
    if "mig-devices" in fields:
        counts = _mapping(fields["mig-devices"][1], source, f"{where}.mig-devices")
        parsed = []
        for profile, (_, v) in counts.items():
            if not (isinstance(v, yaml.ScalarNode) and str(v.value).isdigit() and int(v.value) > 0):
                _fail(source, v, f"{where}.mig-devices.{profile}: {v.value!r} must be a count of 1 or more")
            parsed.append((profile, int(v.value)))
        devices = tuple(parsed)
    layout = None
    if "layout" in fields:
        layout_node = fields["layout"][1]
        if not isinstance(layout_node, yaml.ScalarNode):
            _fail(source, layout_node, f"{where}.layout must be a string like '3g.40gb@4 + 1g.10gb@0'")
        layout = str(layout_node.value)
    entry = ConfigEntry(
        line=fields["mig-devices" if devices else "layout"][0].start_mark.line + 1, gpu_models=models,
        nodes=_names(fields["nodes"][1], source, "nodes") if "nodes" in fields else (),
        gpus=gpus, devices=devices, layout=layout,
    )
    for model_name in models:  # check now what can be checked: the entry fits each model it names
        _entry_layout(entry, get_model(model_name), source)
    return entry


def _items(pair) -> list:
    if pair is None:
        return []
    node = pair[1]
    return [node] if isinstance(node, yaml.ScalarNode) else list(node.value)


def _entry_layout(entry: ConfigEntry, model: GpuModel, source: str) -> Layout:
    where = f"{source}:{entry.line}"
    try:
        if entry.layout is not None:
            return Layout.parse(model.name, entry.layout).validate_on(model)
        return pack(model, dict(entry.devices))
    except PrefectMigError as exc:
        raise ConfigError(f"{where}: on {model.name}: {exc}", field="layouts_file") from exc


def pack(model: GpuModel, counts: Mapping[str, int]) -> Layout:
    """A valid layout of `model` with exactly `counts` instances per profile, placed by search
    (largest first, lowest start first).

    Raises:
        UnknownProfile: a profile `model` lacks. InvalidLayout: the counts do not fit one GPU.
    """
    from prefect_mig.errors import InvalidLayout

    profiles = {name: model.profile(name, field="mig-devices") for name in counts}
    alone = " and ".join(f"{profiles[name].max_instances} of {name}" for name in counts)
    does_not_fit = InvalidLayout(
        f"mig-devices: {dict(counts)} do not fit on one {model.name} ({model.memory_slices} memory slices); "
        f"alone, at most {alone} fit; `prefect-mig layouts {model.name}` lists the layouts that do.",
        field="mig-devices",
        value=str(dict(counts)),
    )
    if sum(counts.values()) > model.memory_slices:  # each instance takes a memory slice: refused before listing them
        raise does_not_fit
    wanted = sorted((profiles[name] for name, n in counts.items() for _ in range(n)), key=lambda p: (-p.placement_size, p.name))
    chosen: list[Placement] = []

    def place(i: int, mask: int) -> bool:
        if i == len(wanted):
            return True
        prof = wanted[i]
        for start in prof.placement_starts:
            bits = _bits(start, prof.placement_size)
            if start + prof.placement_size <= model.memory_slices and not mask & bits:
                chosen.append(Placement(profile=prof.name, start=start))
                if place(i + 1, mask | bits):
                    return True
                chosen.pop()
        return False

    if not place(0, 0):
        raise does_not_fit
    return Layout.of(model, chosen).validate_on(model)


def keep_busy(model: GpuModel, target: Layout, busy: frozenset[Placement] | set[Placement]) -> tuple[Layout, list[Placement], list[Placement]]:
    """What to carve when `busy` instances must stay: (layout, busy ones kept that `target` lacks,
    target instances left out because they overlap a kept one). Busy slices are never destroyed."""
    kept = sorted((p for p in busy if p not in target.instances), key=lambda p: p.start)
    taken = 0
    for p in busy:
        taken |= _bits(p.start, model.profile(p.profile).placement_size)
    chosen, dropped = list(busy), []
    for p in target.instances:
        if p in busy:
            continue
        bits = _bits(p.start, model.profile(p.profile).placement_size)
        if taken & bits:
            dropped.append(p)
            continue
        taken |= bits
        chosen.append(p)
    layout = Layout.of(model, chosen)
    while chosen and not _valid(model, layout):  # per-profile limits: drop target instances from the end
        extra = next((p for p in reversed(layout.instances) if p not in busy), None)
        if extra is None:
            break
        chosen.remove(extra)
        dropped.append(extra)
        layout = Layout.of(model, chosen)
    return layout, kept, dropped


def _valid(model: GpuModel, layout: Layout) -> bool:
    from prefect_mig.model.layout import is_valid_layout

    return is_valid_layout(model, layout.instances)
