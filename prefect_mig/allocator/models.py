"""What crosses the allocator's boundary: requests, slices, leases, quotas, and the clock.

Examples:
    ```python
    from prefect_mig.allocator import SliceRequest

    req = SliceRequest(profile="1g.10gb", priority=5, tenant="team-a")
    assert req.candidate_pkeys(["H100-80GB", "A30-24GB"]) == ["H100-80GB/1g.10gb"]
    assert SliceRequest(min_memory_gb=20).candidate_pkeys(["H100-80GB"])[0] == "H100-80GB/1g.20gb"
    ```
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_mig.errors import InvalidRequirement, Unsatisfiable, UnknownProfile
from prefect_mig.model import GpuModel, MigProfileName, SliceRequirement, catalog, get_model

PRIORITY_MIN, PRIORITY_MAX = 0, 100
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]


def pkey(gpu_model: str, profile: str) -> str:
    """The key of one kind of slice: ``H100-80GB/1g.10gb`` (profile names differ across models)."""
    return f"{gpu_model}/{profile}"


class SliceRequest(BaseModel):
    """What a step asks the allocator for.

    Give an exact `profile`, or minimums (`min_memory_gb`, `min_compute_slices`); the allocator
    grants the smallest free slice that satisfies them. `gpu_model` and `node` narrow where.

    Examples:
        ```python
        from prefect_mig.allocator import SliceRequest

        SliceRequest(profile="3g.40gb", priority=9, preemptible=False, ttl_s=120)
        SliceRequest(min_memory_gb=20, gpu_model="H100-80GB", tenant="research")
        ```
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: MigProfileName | None = Field(default=None, description="Exact MIG profile, e.g. 1g.10gb.")
    min_memory_gb: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False, description="At least this much memory (GB).")
    min_compute_slices: int | None = Field(default=None, ge=1, le=8, description="At least this many compute slices.")
    gpu_model: str | None = Field(default=None, description="Only GPUs of this model, e.g. H100-80GB.")
    node: Name | None = Field(default=None, description="Only slices on this node.")
    priority: int = Field(
        default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Higher is served first (0 to 100)."
    )
    tenant: Name = Field(default="default", description="Who is charged for the slice (quotas).")
    holder: str = Field(default="", max_length=256, description="Who holds it, e.g. a flow run / task run id.")
    ttl_s: float = Field(default=60.0, ge=1, le=86_400, allow_inf_nan=False, description="Lease time to live, renewed by the client.")
    preemptible: bool = Field(default=False, description="A higher-priority request may revoke this lease.")

    @field_validator("gpu_model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        return None if value is None else get_model(value, field="gpu_model").name

    @model_validator(mode="after")
    def _requirement(self) -> SliceRequest:
        self.requirement  # noqa: B018 - validates "exact xor minimums"
        return self

    @property
    def requirement(self) -> SliceRequirement:
        return SliceRequirement(
            profile=self.profile, min_memory_gb=self.min_memory_gb, min_compute_slices=self.min_compute_slices
        )

    def candidate_pkeys(self, gpu_models: Iterable[str]) -> list[str]:
        """Slice kinds that satisfy this request among `gpu_models`, best fit (smallest) first.

        Raises:
            UnknownProfile: an exact profile that none of the models offers (lists what they offer), or
                that the model the request names (`gpu_model`) does not offer (lists that model's).
            Unsatisfiable: the request names a `gpu_model` none of `gpu_models` is (field ``gpu_model``).
            InvalidRequirement: minimums that none of the models reaches.
        """
        fleet = [get_model(m) for m in gpu_models]
        models = [m for m in fleet if self.gpu_model in (None, m.name)]
        absent = self.gpu_model is not None and not models
        if absent:  # judge the request on the model it names: is it the profile or the fleet that is wrong?
            models = [get_model(self.gpu_model)]
        need = self.requirement
        found = [(p.memory_mib, p.compute_slices, pkey(m.name, p.name)) for m in models for p in need.candidates(m)]
        if found and absent:
            have = sorted({m.name for m in fleet})
            raise Unsatisfiable(
                f"gpu_model: the fleet has no {self.gpu_model} GPU, so no {need} slice on one can be granted; "
                f"its GPUs are: {', '.join(have)}. Ask for one of those models (or leave gpu_model unset), "
                "or add a node that has one.",
                offered=[], field="gpu_model", value=self.gpu_model,
            )
        if not found:
            offered = sorted({p for m in models for p in m.profile_names}) or sorted(
                {p for m in catalog().models.values() for p in m.profile_names}
            )
            where = self.gpu_model or ", ".join(sorted({m.name for m in models})) or "the catalog"
            if self.profile is not None:
                raise UnknownProfile(self.profile, where, offered)
            given = {k: v for k, v in (("min_memory_gb", self.min_memory_gb), ("min_compute_slices", self.min_compute_slices))
                     if v is not None}
            largest = [(m, max(m.profiles, key=lambda p: (p.memory_mib, p.compute_slices))) for m in models if m.profiles]
            most = "; the largest there is " + ", ".join(
                f"{p.name} on {m.name} ({p.memory_gb:g} GB, {p.compute_slices} compute slices)" for m, p in largest
            ) if largest else ""
            raise InvalidRequirement(
                f"{', '.join(f'{k}={v:g}' for k, v in given.items())}: no profile on {where} gives {need}{most}.",
                field=next(iter(given), "requirement"), value=str(need),
            )
        return [k for _, _, k in sorted(found)]


class SliceRecord(BaseModel):
    """One MIG slice in the inventory (one GPU instance with its compute instance)."""

    model_config = ConfigDict(frozen=True)

    id: str
    node: str
    gpu_uuid: str
    gpu_index: int
    gpu_model: str
    profile: str
    pkey: str
    start: int
    size: int
    gpu_instance_id: int
    mig_uuid: str
    compute_slices: int
    memory_mib: int
    generation: int = 0
    busy: bool = False  # NVML shows processes on it (reported by the node agent)
    ordinal: int = 0  # the GPU's place in first-fit order (set when published)
    gone: bool = False


def slice_record(
    model: GpuModel,
    profile: str,
    start: int,
    *,
    node: str,
    gpu_uuid: str,
    gpu_index: int,
    gpu_instance_id: int,
    mig_uuid: str,
    **extra: Any,
) -> SliceRecord:
    """The inventory record of one MIG device, its size and kind derived from the model."""
    prof = model.profile(profile)
    return SliceRecord(
        id=mig_uuid,
        node=node,
        gpu_uuid=gpu_uuid,
        gpu_index=gpu_index,
        gpu_model=model.name,
        profile=prof.name,
        pkey=pkey(model.name, prof.name),
        start=start,
        size=prof.placement_size,
        gpu_instance_id=gpu_instance_id,
        mig_uuid=mig_uuid,
        compute_slices=prof.compute_slices,
        memory_mib=prof.memory_mib,
        **extra,
    )


class LeaseInfo(BaseModel):
    """A granted lease as Redis holds it."""

    model_config = ConfigDict(frozen=True)

    lease_id: str
    fence: int
    slice: SliceRecord
    expires_at_ms: int
    holder: str = ""
    tenant: str = "default"
    priority: int = 0
    ttl_ms: int = 60_000
    waited_ms: int = 0
    revoked: bool = False


class Quota(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    slices: int | None = Field(default=None, ge=0, le=100_000, description="At most this many slices at once.")
    compute: int | None = Field(default=None, ge=0, le=1_000_000, description="At most this many compute slices.")


class ManualClock:
    """A virtual clock for the simulator and tests: scripts use it instead of Redis ``TIME``.

    Examples:
        ```python
        from prefect_mig.allocator import ManualClock

        clock = ManualClock(start_ms=1_000)
        clock.advance(2.5)
        assert clock.now_ms() == 3_500
        ```
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._now = int(time.time() * 1000) if start_ms is None else int(start_ms)

    def now_ms(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += int(seconds * 1000)

    def set_ms(self, now_ms: int) -> None:
        """Jump to `now_ms` (never backwards: scripts assume time only grows)."""
        self._now = max(self._now, int(now_ms))

    def __repr__(self) -> str:
        return f"ManualClock(now_ms={self._now})"


def decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


#: A lease's fields that Redis keeps as strings and that JSON (the HTTP API, ``--json``) answers as numbers.
LEASE_NUMBERS = frozenset({"fence", "priority", "ttl_ms", "granted_at", "expires_at", "waited_ms", "compute",
                           "revoked_at", "revoked_priority"})


def lease_row_numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A lease row of `Allocator.status` with its numeric fields as ints (`LEASE_NUMBERS`), for JSON."""
    return {k: int(v) if k in LEASE_NUMBERS and isinstance(v, str) and v.lstrip("-").isdigit() else v
            for k, v in row.items()}
