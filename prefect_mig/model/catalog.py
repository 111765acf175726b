"""The catalog of MIG-capable GPU models and their GPU-instance profiles.

The tables ship with the package (``catalog.json``, derived from NVIDIA's MIG user guide, mig-parted
and go-nvml). On a real GPU the backend reads the same facts from NVML and builds a `GpuModel` from
them; the catalog is the fallback, the simulated NVML's data and the test fixture.

Examples:
    ```python
    from prefect_mig.model import get_model

    h100 = get_model("H100-80GB")
    p = h100.profile("3g.40gb")
    assert (p.compute_slices, p.memory_slices, p.placement_starts) == (3, 4, (0, 4))
    ```
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from prefect_mig.errors import ConfigError, UnknownGpuModel, UnknownProfile

#: NVML_GPU_INSTANCE_PROFILE_* values of the "classic" profiles: 1, 2, 3, 4 and 7 compute slices,
#: without media-engine or half-compute variants. 19 maximal layouts on 8-slice GPUs use only these.
CLASSIC_NVML_PROFILES = frozenset({0, 1, 2, 3, 4})

_PROFILE_NAME = re.compile(r"^(?P<compute>[1-9])g\.(?P<gb>[1-9][0-9]*)gb(?P<suffix>\+me|\+me\.all|-me|\+gfx)?$")


class GpuProfile(BaseModel):
    """One GPU-instance profile of one GPU model, as NVML describes it.

    Attributes:
        id: the NVML profile id (``nvidia-smi mig -lgip`` "ID"); differs between GPU families.
        name: the profile name on this model, e.g. ``1g.10gb`` or ``1g.10gb+me``.
        nvml_profile: the ``NVML_GPU_INSTANCE_PROFILE_*`` value that reads this profile's info.
        placement_starts: memory-slice indices where an instance of this profile may start.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Annotated[int, Field(ge=0)]
    name: str
    nvml_profile: Annotated[int, Field(ge=0)]
    compute_slices: Annotated[int, Field(ge=1, le=8)]
    memory_slices: Annotated[int, Field(ge=1, le=8)]
    memory_mib: Annotated[int, Field(gt=0)]
    memory_mib_estimated: bool = False
    sm_count: int | None = None
    max_instances: Annotated[int, Field(ge=1, le=8)]
    placement_starts: tuple[int, ...]
    placement_size: Annotated[int, Field(ge=1, le=8)]

    @property
    def media_engines(self) -> bool:
        """True for ``+me`` profiles, which own the GPU's media engines (at most one per GPU)."""
        return "+me" in self.name

    @property
    def memory_gb(self) -> int:
        """The nominal memory in GB, as written in the profile name."""
        return int(_PROFILE_NAME.match(self.name)["gb"])  # type: ignore[index]

    @property
    def classic(self) -> bool:
        return self.nvml_profile in CLASSIC_NVML_PROFILES


class GpuModel(BaseModel):
    """A MIG-capable GPU model: its slice geometry and the profiles it offers.

    Examples:
        ```python
        from prefect_mig.model import get_model

        a30 = get_model("A30-24GB")
        assert a30.memory_slices == 4
        assert [p.name for p in a30.classic_profiles] == ["1g.6gb", "2g.12gb", "4g.24gb"]
        ```
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    device_name: str
    total_memory_mib: Annotated[int, Field(gt=0)]
    memory_slices: Annotated[int, Field(ge=1, le=8)]
    compute_slices: Annotated[int, Field(ge=1, le=8)]
    confidence: str = "high"
    reference_key: str | None = None
    #: NVML ``pciDeviceId`` values ((device << 16) | 0x10DE) of this model and its renamed variants
    pci_device_ids: tuple[int, ...] = ()
    #: a model the catalog does not list, built from NVML's own profile and placement queries on a
    #: node (`prefect_mig.gpu.GpuBackend.gpu_model`); its node agent publishes it to Redis so other
    #: processes know it (`prefect_mig.allocator.Allocator.load_models`)
    built_from_nvml: bool = False
    profiles: tuple[GpuProfile, ...]

    @property
    def profile_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    @property
    def classic_profiles(self) -> tuple[GpuProfile, ...]:
        return tuple(p for p in self.profiles if p.classic)

    def profile(self, name: str | int, *, field: str = "profile") -> GpuProfile:
        """The profile called `name` (or with NVML profile id `name` when an int).

        Raises:
            UnknownProfile: the model has no such profile; the message lists the ones it has.
        """
        key = "id" if isinstance(name, int) else "name"
        for p in self.profiles:  # at most a dozen: a scan beats a cache that model_copy would carry over
            if getattr(p, key) == name:
                return p
        raise UnknownProfile(str(name), self.name, self.profile_names, field=field)

    def has_profile(self, name: str) -> bool:
        return name in self.profile_names


class Catalog(BaseModel):
    """All GPU models prefect-mig knows, keyed by short name (``H100-80GB``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    about: str = ""
    models: dict[str, GpuModel]

    def get(self, name: str, *, field: str = "gpu_model") -> GpuModel:
        """The model called `name` (case-insensitive).

        Raises:
            UnknownGpuModel: no such model; the message lists the known ones.
        """
        for key, model in self.models.items():
            if key.lower() == str(name).lower():
                return model
        if str(name).lower() in _REGISTERED:
            return _REGISTERED[str(name).lower()]
        raise UnknownGpuModel(str(name), [*self.models, *(m.name for m in _REGISTERED.values())], field=field)

    def identify(self, device_name: str, total_memory_mib: int, *, pci_device_id: int | None = None) -> GpuModel | None:
        """The catalog model that an NVML device name and memory size describe, if any.

        The PCI device id, when given and listed, picks the models first (it survives renames: a
        driver that does not know a marketing name says "NVIDIA Graphics Device"). Otherwise the
        device name picks the family (``H100``, ``A100``; A800, H800 and H20 map to theirs). The
        memory size picks the model among the candidates (closest total memory).
        """
        candidates = [m for m in self.models.values() if pci_device_id is not None and pci_device_id in m.pci_device_ids]
        if not candidates:
            family = _family(device_name)
            candidates = [m for m in self.models.values() if _family(m.device_name) == family]
        if not candidates:
            return None
        return min(candidates, key=lambda m: abs(m.total_memory_mib - total_memory_mib))


#: NVML names of renamed and export variants -> the family whose MIG geometry they share
#: (A800 = A100, H800 = H100; H20 shares GH200-96GB's profile names, per mig-profiles.json).
_FAMILY_ALIASES = {"A800": "A100", "H800": "H100", "H20": "GH200"}


def _family(device_name: str) -> str:
    found = re.search(r"\b(GH200|GB200|A100|A800|A30|H100|H800|H200|H20|B200|B300)\b", device_name.replace("-", " "))
    if not found:
        return device_name
    return _FAMILY_ALIASES.get(found.group(1), found.group(1))


#: Models read from NVML for GPUs the catalog does not list (`register_model`), by lower-case name.
_REGISTERED: dict[str, GpuModel] = {}


def register_model(model: GpuModel) -> GpuModel:
    """Make a model the catalog does not list (built from NVML's own profile and placement
    queries) known by name in this process, so layouts and requests can name it. Registering the
    same name again replaces the model (the driver that reported it last is the authority).

    Raises:
        ConfigError: the name is a catalog model's (the catalog's geometry stays authoritative).
    """
    if any(key.lower() == model.name.lower() for key in catalog().models):
        raise ConfigError(
            f"gpu_model: {model.name!r} is a catalog model; only GPUs outside the catalog are registered.",
            field="gpu_model",
            value=model.name,
        )
    _REGISTERED[model.name.lower()] = model
    return model


def _load(data: dict) -> Catalog:
    models = {name: GpuModel(name=name, **body) for name, body in data["models"].items()}
    return Catalog(version=data["version"], about=data.get("about", ""), models=models)


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """The catalog that ships with the package."""
    text = resources.files("prefect_mig.model").joinpath("catalog.json").read_text()
    return _load(json.loads(text))


def get_model(name: str, *, field: str = "gpu_model") -> GpuModel:
    """Shortcut for ``catalog().get(name)``."""
    return catalog().get(name, field=field)
