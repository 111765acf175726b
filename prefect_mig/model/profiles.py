"""MIG profile names and slice requirements.

A step asks either for an exact profile (``1g.10gb``) or for a minimum ("at least 20 GB and/or at
least 2 compute slices"); `SliceRequirement` says which profiles of a GPU model satisfy it,
smallest first.

Examples:
    ```python
    from prefect_mig.model import SliceRequirement, get_model, parse_profile_name

    assert parse_profile_name("1g.10gb+me").media_engines
    need = SliceRequirement.parse(">=20gb")
    assert [p.name for p in need.candidates(get_model("H100-80GB"))] == [
        "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]
    ```
"""

from __future__ import annotations

import re
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from prefect_mig.errors import InvalidProfileName, InvalidRequirement
from prefect_mig.model.catalog import _PROFILE_NAME, GpuModel, GpuProfile


class ProfileName(NamedTuple):
    """The parts of a profile name: ``3g.40gb`` is ``ProfileName(3, 40, None)``."""

    compute_slices: int
    memory_gb: int
    suffix: str | None

    @property
    def media_engines(self) -> bool:
        return bool(self.suffix and self.suffix.startswith("+me"))

    def __str__(self) -> str:
        return f"{self.compute_slices}g.{self.memory_gb}gb{self.suffix or ''}"


def parse_profile_name(name: object, *, field: str = "profile") -> ProfileName:
    """Split a profile name into compute slices, nominal GB and suffix.

    Raises:
        InvalidProfileName: `name` is not shaped like ``<C>g.<M>gb[+me]``.
    """
    found = _PROFILE_NAME.match(name.strip().lower()) if isinstance(name, str) else None
    if not found:
        raise InvalidProfileName(name, field=field)
    return ProfileName(int(found["compute"]), int(found["gb"]), found["suffix"])


def _profile_name(value: str) -> str:
    parse_profile_name(value)
    return value.strip().lower()


#: A string that is shaped like a MIG profile name (whether a given GPU offers it is checked later).
MigProfileName = Annotated[str, AfterValidator(_profile_name)]

_MIN_TERM = re.compile(r"^>=\s*(?:(?P<gb>\d+(?:\.\d+)?)\s*gb|(?P<g>[1-8])\s*g)$")


class SliceRequirement(BaseModel):
    """What a step needs: an exact profile, or at least so much memory and/or compute.

    Give either `profile`, or one or both of `min_memory_gb` and `min_compute_slices`. Minimums match
    by the nominal GB in the profile name and never pick a ``+me`` profile (those are scarce: one
    per GPU); ask for a ``+me`` profile by name.

    Examples:
        ```python
        from prefect_mig.model import SliceRequirement, get_model

        need = SliceRequirement(min_memory_gb=30, min_compute_slices=3)
        assert need.resolve(get_model("A100-80GB")).name == "3g.40gb"
        assert SliceRequirement.parse("1g.10gb") == SliceRequirement(profile="1g.10gb")
        ```
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: MigProfileName | None = Field(
        default=None, description="An exact MIG profile name such as 1g.10gb."
    )
    min_memory_gb: float | None = Field(
        default=None, gt=0, le=1024, description="At least this much GPU memory, in GB."
    )
    min_compute_slices: int | None = Field(
        default=None, ge=1, le=8, description="At least this many compute slices (the 'g' number)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SliceRequirement:
        has_min = self.min_memory_gb is not None or self.min_compute_slices is not None
        if self.profile is not None and has_min:
            raise ValueError(
                "give either an exact profile or minimums (min_memory_gb, min_compute_slices), "
                "not both"
            )
        if self.profile is None and not has_min:
            raise ValueError(
                "give an exact profile (e.g. profile='1g.10gb') or at least one minimum "
                "(min_memory_gb, min_compute_slices)"
            )
        return self

    @classmethod
    def parse(cls, text: str, *, field: str = "requirement") -> SliceRequirement:
        """Parse ``1g.10gb`` (exact), ``>=20gb``, ``>=3g`` or ``>=3g,>=40gb`` (minimums).

        Raises:
            InvalidRequirement: the text is neither form.
        """
        text = str(text).strip().lower()
        if not text.startswith(">="):
            try:
                return cls(profile=str(parse_profile_name(text, field=field)))
            except InvalidProfileName as exc:
                raise InvalidRequirement(
                    f"{field}: {text!r} is neither a profile name (e.g. '1g.10gb') nor minimums "
                    "(e.g. '>=20gb', '>=3g' or '>=3g,>=40gb').",
                    field=field,
                    value=text,
                ) from exc
        mins: dict[str, float | int] = {}
        for term in text.split(","):
            found = _MIN_TERM.match(term.strip())
            if not found:
                raise InvalidRequirement(
                    f"{field}: cannot read {term.strip()!r} in {text!r}; minimums look like "
                    "'>=20gb' (memory) or '>=3g' (compute slices), joined by commas.",
                    field=field,
                    value=text,
                )
            if found["gb"]:
                mins["min_memory_gb"] = float(found["gb"])
            else:
                mins["min_compute_slices"] = int(found["g"])
        return cls(**mins)

    def __str__(self) -> str:
        if self.profile:
            return self.profile
        terms = []
        if self.min_compute_slices is not None:
            terms.append(f">={self.min_compute_slices}g")
        if self.min_memory_gb is not None:
            terms.append(f">={self.min_memory_gb:g}gb")
        return ",".join(terms)

    def matches(self, profile: GpuProfile) -> bool:
        """True when an instance of `profile` satisfies this requirement."""
        if self.profile is not None:
            return profile.name == self.profile
        if profile.media_engines:
            return False
        if self.min_memory_gb is not None and profile.memory_gb < self.min_memory_gb:
            return False
        if self.min_compute_slices is not None and profile.compute_slices < self.min_compute_slices:
            return False
        return True

    def candidates(self, model: GpuModel) -> list[GpuProfile]:
        """The profiles of `model` that satisfy this requirement, smallest first."""
        found = [p for p in model.profiles if self.matches(p)]
        return sorted(found, key=lambda p: (p.memory_slices, p.compute_slices, p.memory_mib, p.id))

    def resolve(self, model: GpuModel) -> GpuProfile:
        """The smallest profile of `model` that satisfies this requirement.

        Raises:
            UnknownProfile: an exact profile the model does not offer.
            InvalidRequirement: minimums that no profile of the model reaches.
        """
        if self.profile is not None:
            return model.profile(self.profile)
        found = self.candidates(model)
        if not found:
            biggest = max(model.profiles, key=lambda p: (p.memory_slices, p.compute_slices))
            raise InvalidRequirement(
                f"requirement: no profile of {model.name} gives {self}; the largest is "
                f"{biggest.name}.",
                field="requirement",
                value=str(self),
            )
        return found[0]
