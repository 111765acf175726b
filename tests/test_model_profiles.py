from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefect_mig.errors import InvalidProfileName, InvalidRequirement, UnknownProfile
from prefect_mig.model import ProfileName, SliceRequirement, get_model, parse_profile_name


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1g.10gb", ProfileName(1, 10, None)),
        ("3g.40gb", ProfileName(3, 40, None)),
        ("1g.10gb+me", ProfileName(1, 10, "+me")),
        (" 7G.80GB ", ProfileName(7, 80, None)),
    ],
)
def test_profile_names_parse_into_compute_memory_and_suffix(text, parsed):
    assert parse_profile_name(text) == parsed


@pytest.mark.parametrize("bad", ["", "1g", "g.10gb", "10gb", "1g.10", "0g.10gb", "1g.10gb+xx", 3, None])
def test_malformed_profile_names_are_refused_with_an_example(bad):
    with pytest.raises(InvalidProfileName) as refused:
        parse_profile_name(bad, field="mig_profile")
    assert refused.value.field == "mig_profile" and "'1g.10gb'" in str(refused.value)


def test_media_engine_suffix_is_recognised():
    assert parse_profile_name("1g.10gb+me").media_engines
    assert not parse_profile_name("1g.10gb").media_engines


def test_exact_requirement_resolves_to_that_profile_or_lists_the_models_profiles():
    need = SliceRequirement(profile="3g.40gb")
    assert need.resolve(get_model("H100-80GB")).id == 9
    with pytest.raises(UnknownProfile) as refused:
        need.resolve(get_model("A30-24GB"))
    assert "4g.24gb" in str(refused.value)


def test_minimum_requirement_picks_the_smallest_satisfying_profile():
    h100 = get_model("H100-80GB")
    assert SliceRequirement(min_memory_gb=15).resolve(h100).name == "1g.20gb"
    assert SliceRequirement(min_compute_slices=2).resolve(h100).name == "2g.20gb"
    assert SliceRequirement(min_memory_gb=30, min_compute_slices=1).resolve(h100).name == "3g.40gb"
    assert SliceRequirement(min_compute_slices=4).resolve(h100).name == "4g.40gb"
    assert SliceRequirement(min_memory_gb=41).resolve(h100).name == "7g.80gb"


def test_minimums_never_pick_a_media_engine_profile():
    names = [p.name for p in SliceRequirement(min_memory_gb=1).candidates(get_model("A30-24GB"))]
    assert names == ["1g.6gb", "2g.12gb", "4g.24gb"]


def test_unreachable_minimum_names_the_largest_profile():
    with pytest.raises(InvalidRequirement) as refused:
        SliceRequirement(min_memory_gb=100).resolve(get_model("A100-40GB"))
    assert "7g.40gb" in str(refused.value) and refused.value.field == "requirement"


@pytest.mark.parametrize(
    ("text", "need"),
    [
        ("1g.10gb", SliceRequirement(profile="1g.10gb")),
        (">=20gb", SliceRequirement(min_memory_gb=20)),
        (">=3g", SliceRequirement(min_compute_slices=3)),
        (">=3g,>=40gb", SliceRequirement(min_compute_slices=3, min_memory_gb=40)),
    ],
)
def test_requirement_text_round_trips(text, need):
    assert SliceRequirement.parse(text) == need
    assert SliceRequirement.parse(str(need)) == need


@pytest.mark.parametrize("bad", [">=", ">=20tb", "twenty", ">=9g", "1g.10gb,>=3g"])
def test_unreadable_requirement_text_is_refused(bad):
    with pytest.raises(InvalidRequirement) as refused:
        SliceRequirement.parse(bad)
    assert refused.value.value is not None


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({}, "give an exact profile"),
        ({"profile": "1g.10gb", "min_memory_gb": 5}, "not both"),
        ({"profile": "ten gigs"}, "not a MIG profile name"),
        ({"min_memory_gb": -1}, "greater than 0"),
        ({"min_compute_slices": 9}, "less than or equal to 8"),
        ({"profile": "1g.10gb", "priority": 3}, "Extra inputs"),
    ],
)
def test_requirement_fields_are_validated_with_the_field_named(fields, complaint):
    with pytest.raises(ValidationError) as refused:
        SliceRequirement(**fields)
    assert complaint in str(refused.value)
