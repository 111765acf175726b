from __future__ import annotations

import pytest

from prefect_mig.errors import InvalidFleetSpec, UnknownGpuModel
from prefect_mig.model import FleetSpec


def test_fleet_spec_lists_each_nodes_gpus_in_order():
    fleet = FleetSpec.parse("node-a=2xH100-80GB+1xA30-24GB, node-b=A100-40GB")
    assert fleet.node_names == ["node-a", "node-b"]
    assert fleet.gpu_models("node-a") == ["H100-80GB", "H100-80GB", "A30-24GB"]
    assert str(fleet) == "node-a=2xH100-80GB+1xA30-24GB,node-b=1xA100-40GB"
    assert FleetSpec.parse(str(fleet)) == fleet


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty fleet spec"),
        ("node-a", "cannot read node"),
        ("node-a=2xH100-80GB,node-a=1xA30-24GB", "appears twice"),
        ("node-a=0xH100-80GB", "allowed 1 to 16"),
        ("node-a=2xH100-80GB++", "cannot read GPUs"),
        ("bad node=1xA30-24GB", "cannot read node"),
    ],
)
def test_bad_fleet_specs_are_refused_with_an_example(text, complaint):
    with pytest.raises(InvalidFleetSpec) as refused:
        FleetSpec.parse(text)
    assert complaint in str(refused.value)
    assert refused.value.field == "simulated_fleet"


def test_unknown_gpu_model_in_a_fleet_lists_the_known_models():
    with pytest.raises(UnknownGpuModel) as refused:
        FleetSpec.parse("node-a=1xRTX-4090")
    assert "H100-80GB" in str(refused.value) and refused.value.field == "simulated_fleet"


def test_asking_for_a_node_that_is_not_in_the_fleet_names_the_nodes():
    with pytest.raises(InvalidFleetSpec) as refused:
        FleetSpec.parse("a=1xA30-24GB,b=1xA30-24GB").gpu_models("c")
    assert "nodes: a, b" in str(refused.value)
