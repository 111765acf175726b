"""MIG layouts: which GPU instances can coexist on one GPU, and what can still be created.

A GPU instance of a profile occupies memory slices ``[start, start + size)``; ``start`` must be one
of the profile's placement starts. A layout is valid when no two instances overlap, no profile has
more instances than its ``max_instances`` and at most one instance owns the media engines
(``+me``). Under the published placements compute never exceeds the GPU's, so these rules suffice.

Validity is closed under taking subsets, so "profile P can be created at start s next to the
instances L" holds exactly when some maximal layout contains L plus ``P@s``. `creatable` computes
that directly from the occupied ranges (the fragmentation view); `enumerate_layouts` lists the
maximal layouts. A property test checks the two agree.

Examples:
    ```python
    from prefect_mig.model import Placement, creatable, enumerate_layouts, get_model

    h100 = get_model("H100-80GB")
    assert len(enumerate_layouts(h100)) == 19
    busy = [Placement(profile="1g.10gb", start=1)]      # a 1g in the first half
    assert {p.profile for p in creatable(h100, busy)} >= {"3g.40gb", "2g.20gb", "1g.10gb"}
    assert "4g.40gb" not in {p.profile for p in creatable(h100, busy)}
    ```
"""

from __future__ import annotations

import re

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from prefect_mig.errors import InvalidLayout
from prefect_mig.model.catalog import GpuModel, GpuProfile


class Placement(BaseModel):
    """One GPU instance in a layout: a profile name and the memory slice where it starts.

    Written ``3g.40gb@4``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str
    start: Annotated[int, Field(ge=0, le=7)]

    def __str__(self) -> str:
        return f"{self.profile}@{self.start}"

    @classmethod
    def parse(cls, text: str) -> Placement:
        """Read ``3g.40gb@4``."""
        profile, sep, start = str(text).strip().partition("@")
        if not sep or not start.strip().isdigit():
            raise InvalidLayout(
                f"layout: {text!r} is not a placement; write '<profile>@<start>', e.g. '3g.40gb@4'.",
                field="layout",
                value=text,
            )
        return cls(profile=profile.strip(), start=int(start))

    def span(self, model: GpuModel) -> range:
        """The memory slices this instance occupies on `model`."""
        return range(self.start, self.start + model.profile(self.profile).placement_size)


class Layout(BaseModel):
    """A set of GPU instances on one GPU of a given model, sorted by start.

    Examples:
        ```python
        from prefect_mig.model import Layout, get_model

        layout = Layout.parse("H100-80GB", "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5")
        layout.validate_on(get_model("H100-80GB"))
        assert str(layout) == "3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5"
        ```
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_model: str
    instances: tuple[Placement, ...] = ()

    @classmethod
    def of(cls, model: GpuModel, instances: Iterable[Placement]) -> Layout:
        return cls(gpu_model=model.name, instances=tuple(sorted(instances, key=_order)))

    @classmethod
    def parse(cls, gpu_model: str, text: str) -> Layout:
        """Read ``"3g.40gb@0 + 1g.10gb@4"`` (``+`` or ``,`` between instances, spaces or not; empty = no
        instance). A ``+`` before a letter belongs to the profile (``1g.10gb+me@0``)."""
        parts = [p for p in re.split(r"\s*,\s*|\s*\+\s*(?=\d)|\s+\+\s+", text) if p.strip()]
        return cls(gpu_model=gpu_model, instances=tuple(sorted(map(Placement.parse, parts), key=_order)))

    def __str__(self) -> str:
        return " + ".join(map(str, self.instances)) or "(empty)"

    def validate_on(self, model: GpuModel) -> Layout:
        validate_layout(model, self.instances)
        return self

    def profile_counts(self) -> dict[str, int]:
        return dict(Counter(p.profile for p in self.instances))

    def used_slices(self, model: GpuModel) -> int:
        return sum(model.profile(p.profile).placement_size for p in self.instances)


def _order(p: Placement) -> tuple[int, str]:
    return (p.start, p.profile)


def validate_layout(model: GpuModel, instances: Iterable[Placement], *, field: str = "layout") -> None:
    """Check that `instances` can coexist on one GPU of `model`.

    Raises:
        UnknownProfile: an instance names a profile the model does not have.
        InvalidLayout: a start that is not a placement of its profile, two instances that overlap,
            more instances of a profile than it allows, or more than one ``+me`` instance.
    """
    owner: dict[int, Placement] = {}
    counts: Counter[str] = Counter()
    media: list[Placement] = []
    for inst in instances:
        prof = model.profile(inst.profile, field=f"{field}.profile")
        if inst.start not in prof.placement_starts:
            raise InvalidLayout(
                f"{field}: {inst} starts at memory slice {inst.start}, but {prof.name} on {model.name} "
                f"may start only at {', '.join(map(str, prof.placement_starts))}.",
                field=field,
                value=str(inst),
            )
        for s in range(inst.start, inst.start + prof.placement_size):
            if s in owner:
                raise InvalidLayout(
                    f"{field}: {inst} overlaps {owner[s]} on memory slice {s}; instances on one GPU "
                    "may not share memory slices.",
                    field=field,
                    value=str(inst),
                )
            owner[s] = inst
        counts[prof.name] += 1
        if counts[prof.name] > prof.max_instances:
            raise InvalidLayout(
                f"{field}: {counts[prof.name]} instances of {prof.name}, but {model.name} allows at "
                f"most {prof.max_instances}.",
                field=field,
                value=prof.name,
            )
        if prof.media_engines:
            media.append(inst)
            if len(media) > 1:
                raise InvalidLayout(
                    f"{field}: {media[0]} and {inst} both ask for the media engines; a GPU has one "
                    "set, so at most one '+me' instance.",
                    field=field,
                    value=str(inst),
                )


def is_valid_layout(model: GpuModel, instances: Iterable[Placement]) -> bool:
    try:
        validate_layout(model, instances)
    except InvalidLayout:
        return False
    return True


ProfileSet = Literal["classic", "all"] | Sequence[str]


def select_profiles(model: GpuModel, profiles: ProfileSet = "classic") -> tuple[GpuProfile, ...]:
    """The profiles a computation considers: ``"classic"`` (1/2/3/4/7 g, no ``+me``, no 2-slice
    1g), ``"all"``, or an explicit list of names."""
    if profiles == "classic":
        return model.classic_profiles
    if profiles == "all":
        return model.profiles
    return tuple(model.profile(name) for name in profiles)


class _Occupancy:
    """Occupied memory slices, per-profile counts and media use: the state `creatable` reads."""

    __slots__ = ("mask", "counts", "media")

    def __init__(self, model: GpuModel, instances: Iterable[Placement]) -> None:
        self.mask = 0
        self.counts: Counter[str] = Counter()
        self.media = False
        for inst in instances:
            prof = model.profile(inst.profile)
            self.mask |= _bits(inst.start, prof.placement_size)
            self.counts[prof.name] += 1
            self.media |= prof.media_engines

    def allows(self, prof: GpuProfile, start: int) -> bool:
        return (
            self.mask & _bits(start, prof.placement_size) == 0
            and self.counts[prof.name] < prof.max_instances
            and not (prof.media_engines and self.media)
        )


def _bits(start: int, size: int) -> int:
    return ((1 << size) - 1) << start


def creatable(
    model: GpuModel, occupied: Iterable[Placement], profiles: ProfileSet = "all"
) -> list[Placement]:
    """Every instance that could be created next to `occupied` (which must be valid), by start.

    This is the fragmentation view: free memory slices that no profile can use do not show up.
    """
    occ = _Occupancy(model, occupied)
    found = [
        Placement(profile=prof.name, start=start)
        for prof in select_profiles(model, profiles)
        for start in prof.placement_starts
        if start + prof.placement_size <= model.memory_slices and occ.allows(prof, start)
    ]
    return sorted(found, key=_order)


def creatable_profiles(
    model: GpuModel, occupied: Iterable[Placement], profiles: ProfileSet = "all"
) -> list[str]:
    """The names of the profiles of which one more instance fits next to `occupied`."""
    names = {p.profile for p in creatable(model, occupied, profiles)}
    return [p.name for p in model.profiles if p.name in names]


def free_slices(model: GpuModel, occupied: Iterable[Placement]) -> list[int]:
    """Memory slices no instance in `occupied` covers."""
    mask = _Occupancy(model, occupied).mask
    return [s for s in range(model.memory_slices) if not mask >> s & 1]


def enumerate_layouts(model: GpuModel, profiles: ProfileSet = "classic") -> list[Layout]:
    """Every maximal valid layout of `model` built from `profiles`.

    Maximal means no instance of those profiles can be added. With the classic profiles an
    8-slice GPU has 19 (78 when the 2-slice 1g is added), an A30 has 5.
    """
    chosen = select_profiles(model, profiles)
    layouts: list[Layout] = []

    def extend(slot: int, current: list[Placement], occ: _Occupancy) -> None:
        if slot >= model.memory_slices:
            if not any(
                occ.allows(p, s)
                for p in chosen
                for s in p.placement_starts
                if s + p.placement_size <= model.memory_slices
            ):
                layouts.append(Layout.of(model, current))
            return
        if occ.mask >> slot & 1:
            extend(slot + 1, current, occ)
            return
        for prof in chosen:
            if slot in prof.placement_starts and slot + prof.placement_size <= model.memory_slices:
                if occ.allows(prof, slot):
                    place = Placement(profile=prof.name, start=slot)
                    current.append(place)
                    occ.mask |= _bits(slot, prof.placement_size)
                    occ.counts[prof.name] += 1
                    media_before = occ.media
                    occ.media |= prof.media_engines
                    extend(slot + 1, current, occ)
                    occ.media = media_before
                    occ.counts[prof.name] -= 1
                    occ.mask &= ~_bits(slot, prof.placement_size)
                    current.pop()
        extend(slot + 1, current, occ)  # leave this slot empty

    extend(0, [], _Occupancy(model, []))
    return layouts


def render_bar(model: GpuModel, instances: Iterable[Placement], *, width: int = 7) -> str:
    """Draw a layout as a bar of memory slices, e.g. ``|3g.40gb           |1g.10gb|...|``.

    Each memory slice is `width` characters; free slices show as dots.
    """
    cells: list[str] = []
    by_start = {p.start: p for p in instances}
    slot = 0
    while slot < model.memory_slices:
        inst = by_start.get(slot)
        if inst is None:
            cells.append("·" * width)
            slot += 1
            continue
        size = model.profile(inst.profile).placement_size
        cells.append(inst.profile.center(size * width + size - 1)[: size * width + size - 1])
        slot += size
    return "|" + "|".join(cells) + "|"
