"""Declarative layout configs: the YAML file, its validation (errors name the line), packing counts
into placements, and keeping busy slices when a config is applied."""

from __future__ import annotations

import pytest

from prefect_mig.errors import ConfigError
from prefect_mig.model import Layout, Placement, catalog, get_model
from prefect_mig.model.layout_configs import LayoutConfigs, keep_busy, pack


def test_the_shipped_configs_are_valid_and_balanced_is_the_default_for_every_classic_model():
    configs = LayoutConfigs.load()
    assert configs.default == "balanced"
    for name in catalog().models:
        layout = configs.layout_for("balanced", gpu_model=name, node="n", gpu_index=0)
        assert layout is not None, name
        layout.validate_on(get_model(name))
    assert configs.layout_for("all-1g.10gb", gpu_model="H100-80GB", node="n", gpu_index=0).profile_counts() == {"1g.10gb": 7}
    assert configs.layout_for("all-1g.10gb", gpu_model="A30-24GB", node="n", gpu_index=0) is None


def test_the_first_matching_entry_wins_so_a_node_and_gpu_override_comes_first():
    configs = LayoutConfigs.parse(
        """version: v1
default: mine
mig-configs:
  mine:
    - nodes: [node-b]
      gpus: [1]
      layout: "3g.40gb@4 + 1g.10gb@0"
    - gpu-models: [H100-80GB]
      mig-devices: {7g.80gb: 1}
"""
    )
    at = lambda node, gpu: str(configs.layout_for("mine", gpu_model="H100-80GB", node=node, gpu_index=gpu))  # noqa: E731
    assert at("node-b", 1) == "1g.10gb@0 + 3g.40gb@4"
    assert at("node-b", 0) == at("node-a", 1) == "7g.80gb@0"


@pytest.mark.parametrize(
    ("body", "line", "named"),
    [
        ("    - gpu-models: [H100-80GB]\n      mig-devices: {3g.40gb: 3}\n", 5, "do not fit"),
        ("    - gpu-models: [H100-80GB]\n      mig-devices: {1g.10gb: 8}\n", 5, "at most 7 of 1g.10gb"),
        ("    - gpu-models: [H100-80GB]\n      mig-devices: {3g.40gb: 2, 1g.10gb: 2}\n", 5,
         "alone, at most 2 of 3g.40gb and 7 of 1g.10gb fit; `prefect-mig layouts H100-80GB` lists"),
        ("    - gpu-models: [H100-80GB]\n      mig-devices: {3g.50gb: 1}\n", 5, "'3g.50gb'"),
        ("    - gpu-models: [H101]\n      mig-devices: {1g.10gb: 1}\n", 4, "'H101'"),
        ("    - gpu-models: [H100-80GB]\n      mig-device: {1g.10gb: 1}\n", 5, "unexpected key 'mig-device'"),
        ("    - gpu-models: [H100-80GB]\n      layout: '3g.40gb@1'\n", 5, "may start only at 0, 4"),
        ("    - gpu-models: [H100-80GB]\n      mig-devices: {1g.10gb: 0}\n", 5, "count of 1 or more"),
    ],
)
def test_a_bad_layouts_file_fails_naming_the_file_line_and_what_is_allowed(body, line, named):
    text = "version: v1\nmig-configs:\n  mine:\n" + body
    with pytest.raises(ConfigError) as caught:
        LayoutConfigs.parse(text, source="my.yaml")
    assert f"my.yaml:{line}:" in str(caught.value)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    "text, line, named",
    [
        ("mig-configs:\n  a:\n    - mig-devices: {7g.80gb: 1}\n  a:\n    - mig-devices: {1g.10gb: 7}\n",
         4, "mig-configs: 'a' is given twice (first at line 3)"),
        ("default: a\nmig-configs:\n  a:\n    - mig-devices: {7g.80gb: 1}\ndefault: a\n", 5, "'default' is given twice"),
        ("mig-configs:\n  a:\n    - mig-devices: {1g.10gb: 1, 1g.10gb: 2}\n", 3, "'1g.10gb' is given twice"),
    ],
    ids=["config", "top-level", "profile"],
)
def test_a_key_given_twice_in_a_layouts_file_is_refused_naming_the_file_the_key_and_both_lines(tmp_path, text, line, named):
    """A second config of one name silently replaced the first (YAML keeps the last key)."""
    path = tmp_path / "twice.yaml"
    path.write_text("version: v1\n" + text)
    with pytest.raises(ConfigError) as caught:
        LayoutConfigs.load(path)
    said = str(caught.value)
    assert said.startswith(f"{path}:{line + 1}:") and named in said, said
    assert caught.value.field == "layouts_file"


def test_an_unknown_config_name_lists_the_names():
    with pytest.raises(ConfigError) as caught:
        LayoutConfigs.load().layout_for("nope", gpu_model="H100-80GB", node="n", gpu_index=0)
    assert "'nope'" in str(caught.value) and "balanced, all-1g" in str(caught.value)


def test_counts_are_packed_into_valid_placements():
    h100 = get_model("H100-80GB")
    assert str(pack(h100, {"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 2})) == "2g.20gb@0 + 1g.10gb@2 + 1g.10gb@3 + 3g.40gb@4"
    assert pack(get_model("A30-24GB"), {"1g.6gb": 4}).profile_counts() == {"1g.6gb": 4}


def test_applying_a_config_keeps_busy_slices_and_leaves_out_what_overlaps_them():
    h100 = get_model("H100-80GB")
    target = Layout.parse("H100-80GB", "7g.80gb@0")
    busy = {Placement(profile="1g.10gb", start=6)}
    layout, kept, left_out = keep_busy(h100, target, busy)
    assert str(layout) == "1g.10gb@6" and kept == [Placement(profile="1g.10gb", start=6)]
    assert left_out == [Placement(profile="7g.80gb", start=0)]
    layout, kept, _ = keep_busy(h100, pack(h100, {"1g.10gb": 7}), busy)
    assert layout.profile_counts() == {"1g.10gb": 7} and kept == []


def test_a_layouts_file_that_is_not_utf8_text_fails_naming_the_file(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError) as caught:
        LayoutConfigs.load(binary)
    assert f"layouts file {binary}:" in str(caught.value) and "UTF-8" in str(caught.value)
    assert caught.value.field == "layouts_file"


@pytest.mark.parametrize("filtered", [False, True])
def test_a_count_more_than_a_gpu_holds_is_refused_at_once_naming_it(filtered):
    """`1g.10gb: 99999999999999999999` in a layouts file hung whoever read it (the agent carving a GPU,
    `prefect-mig up`): the placement search first listed that many instances."""
    models = "      gpu-models: [H100-80GB]\n" if filtered else ""
    text = f"version: v1\ndefault: a\nmig-configs:\n  a:\n    - mig-devices: {{1g.10gb: 99999999999999999999}}\n{models}"
    with pytest.raises(ConfigError) as caught:
        LayoutConfigs.parse(text, source="huge.yaml").layout_for("a", gpu_model="H100-80GB", node="n", gpu_index=0)
    said = str(caught.value)
    assert said.startswith("huge.yaml:5: on H100-80GB:") and "99999999999999999999" in said and "8 memory slices" in said
