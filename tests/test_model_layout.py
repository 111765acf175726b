from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_mig.errors import InvalidLayout, UnknownProfile
from prefect_mig.model import (
    Layout,
    Placement,
    catalog,
    creatable,
    creatable_profiles,
    enumerate_layouts,
    free_slices,
    get_model,
    render_bar,
    validate_layout,
)

from .test_model_catalog import REFERENCE


def _short(layout: Layout) -> str:
    return " + ".join(f"{p.profile.split('.')[0]}@{p.start}" for p in layout.instances)


def test_8_slice_gpus_have_19_maximal_classic_layouts_and_78_with_the_2_slice_1g():
    for name in ("A100-40GB", "A100-80GB", "H100-80GB", "H100-94GB", "H200-141GB"):
        model = get_model(name)
        assert len(enumerate_layouts(model)) == 19, name
        no_media = [p.name for p in model.profiles if not p.media_engines]
        assert len(enumerate_layouts(model, no_media)) == 78, name


def test_a30_has_5_maximal_layouts():
    assert [_short(layout) for layout in enumerate_layouts(get_model("A30-24GB"))] == [
        "1g@0 + 1g@1 + 1g@2 + 1g@3",
        "1g@0 + 1g@1 + 2g@2",
        "2g@0 + 1g@2 + 1g@3",
        "2g@0 + 2g@2",
        "4g@0",
    ]


def test_the_19_layouts_are_exactly_the_reference_list():
    if not REFERENCE.exists():
        pytest.skip("../shared/reference is not beside this checkout")
    listed = json.loads(REFERENCE.read_text())["_meta"]["layout_enumeration"]["8slice_classic_layouts"]
    assert {_short(layout) for layout in enumerate_layouts(get_model("H100-80GB"))} == set(listed)


def test_every_enumerated_layout_is_valid_and_maximal():
    for model in catalog().models.values():
        for layout in enumerate_layouts(model, "all"):
            validate_layout(model, layout.instances)
            assert creatable(model, layout.instances, "all") == []


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("3g.40gb@0 + 2g.20gb@2", "overlaps 3g.40gb@0 on memory slice 2"),
        ("2g.20gb@1", "may start only at 0, 2, 4"),
        ("4g.40gb@0 + 4g.40gb@4", "may start only at 0"),
        ("1g.10gb+me@0 + 1g.10gb+me@1", "at most 1"),
        ("1g.20gb@0 + 1g.20gb@2 + 1g.20gb@4 + 1g.20gb@6 + 1g.10gb@7", "may start only at"),
    ],
)
def test_invalid_layouts_are_refused_with_the_reason(text, complaint):
    with pytest.raises(InvalidLayout) as refused:
        Layout.parse("H100-80GB", text).validate_on(get_model("H100-80GB"))
    assert complaint in str(refused.value)
    assert refused.value.field == "layout"


def test_two_media_engine_instances_of_different_profiles_are_refused():
    a30 = get_model("A30-24GB")
    with pytest.raises(InvalidLayout) as refused:
        validate_layout(a30, [Placement(profile="1g.6gb+me", start=0), Placement(profile="2g.12gb+me", start=2)])
    assert "at most one '+me'" in str(refused.value)


def test_more_instances_than_a_profile_allows_are_refused():
    # No catalog profile has more placements than instances (apart from +me), so make one.
    h100 = get_model("H100-80GB")
    capped = h100.profile("1g.10gb").model_copy(update={"max_instances": 2})
    model = h100.model_copy(update={"profiles": (capped,)})
    two = [Placement(profile="1g.10gb", start=s) for s in (0, 1)]
    validate_layout(model, two)
    with pytest.raises(InvalidLayout) as refused:
        validate_layout(model, [*two, Placement(profile="1g.10gb", start=2)])
    assert "allows at most 2" in str(refused.value)
    assert [str(p) for p in creatable(model, two)] == []


def test_a_layout_naming_an_unknown_profile_lists_the_models_profiles():
    with pytest.raises(UnknownProfile):
        validate_layout(get_model("A30-24GB"), [Placement(profile="3g.40gb", start=0)])


def test_placement_text_must_name_a_start():
    with pytest.raises(InvalidLayout) as refused:
        Placement.parse("3g.40gb")
    assert "'3g.40gb@4'" in str(refused.value)


def test_a_1g_in_the_middle_leaves_no_room_for_4g_or_7g():
    h100 = get_model("H100-80GB")
    busy = [Placement(profile="1g.10gb", start=2)]
    assert creatable_profiles(h100, busy, "classic") == ["1g.10gb", "2g.20gb", "3g.40gb"]
    assert {str(p) for p in creatable(h100, busy, "classic") if p.profile != "1g.10gb"} == {
        "2g.20gb@0",
        "2g.20gb@4",
        "3g.40gb@4",
    }


def test_free_slices_that_no_profile_can_use_are_not_offered():
    h100 = get_model("H100-80GB")
    seven = [Placement(profile="1g.10gb", start=s) for s in range(7)]
    assert free_slices(h100, seven) == [7]
    assert creatable(h100, seven, "all") == []


def test_bar_draws_each_instance_over_its_memory_slices():
    h100 = get_model("H100-80GB")
    bar = render_bar(h100, Layout.parse("H100-80GB", "4g.40gb@0 + 1g.10gb@5").instances)
    cells = bar.strip("|").split("|")
    assert [c.strip() for c in cells] == ["4g.40gb", "·······", "1g.10gb", "·······", "·······"]


MODELS = ["H100-80GB", "A30-24GB", "A100-40GB", "H200-141GB"]


@st.composite
def occupied_layouts(draw):
    """A random valid layout: random instances, each kept only if it still fits."""
    model = get_model(draw(st.sampled_from(MODELS)))
    current: list[Placement] = []
    for _ in range(draw(st.integers(0, 8))):
        options = creatable(model, current, "all")
        if not options:
            break
        current.append(draw(st.sampled_from(options)))
    return model, current


@settings(max_examples=300, deadline=None)
@given(occupied_layouts(), st.data())
def test_what_fits_agrees_with_the_enumerated_maximal_layouts(case, data):
    model, occupied = case
    maximal = [set(layout.instances) for layout in _all_maximal(model.name)]
    have = set(occupied)
    offered = set(creatable(model, occupied, "all"))
    for prof in model.profiles:
        for start in prof.placement_starts:
            candidate = Placement(profile=prof.name, start=start)
            if candidate in have:
                continue
            in_some_maximal = any(have | {candidate} <= m for m in maximal)
            assert (candidate in offered) == in_some_maximal, (str(candidate), [str(p) for p in occupied])


_CACHE: dict[str, list[Layout]] = {}


def _all_maximal(name: str) -> list[Layout]:
    if name not in _CACHE:
        _CACHE[name] = enumerate_layouts(get_model(name), "all")
    return _CACHE[name]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3g.40gb@0+1g.10gb@4", "3g.40gb@0 + 1g.10gb@4"),  # a new user's first try: refused as "not a placement"
        ("3g.40gb@0 +1g.10gb@4", "3g.40gb@0 + 1g.10gb@4"),
        ("1g.10gb+me@0+1g.10gb@1", "1g.10gb+me@0 + 1g.10gb@1"),  # "+me" stays the profile's
        ("1g.10gb+me@0 , 1g.10gb@1", "1g.10gb+me@0 + 1g.10gb@1"),
    ],
)
def test_a_layout_is_read_with_or_without_spaces_around_the_plus(text, expected):
    assert str(Layout.parse("H100-80GB", text)) == expected
