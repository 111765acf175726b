"""The catalog agrees with the reference tables, and the pure model imports nothing impure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_mig.errors import UnknownGpuModel, UnknownProfile
from prefect_mig.model import catalog, get_model

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "mig-profiles.json"
REQUIRED = ["A100-40GB", "A100-80GB", "A30-24GB", "H100-80GB", "H100-94GB", "H200-141GB"]


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{REFERENCE} is missing: CI runs with ../shared beside the checkout")
        pytest.skip(f"{REFERENCE} not found (../shared is not beside this checkout)")
    gpus = json.loads(REFERENCE.read_text())["gpus"]
    return {re.sub(r"\s*\(.*\)$", "", key): value for key, value in gpus.items()}


def test_the_required_gpu_models_offer_the_classic_profiles():
    for name in REQUIRED:
        model = get_model(name)
        expected = 3 if model.memory_slices == 4 else 5
        assert len(model.classic_profiles) == expected, name


def test_every_reference_model_is_in_the_catalog_with_its_confidence(reference):
    assert set(catalog().models) == set(reference)
    for name, ref in reference.items():
        assert get_model(name).confidence == ref.get("placement_confidence", "high")


def test_each_catalog_profile_matches_the_reference_table(reference):
    for name, ref in reference.items():
        model = get_model(name)
        assert (model.memory_slices, model.compute_slices) == (
            ref["memory_slices_total"],
            ref["compute_slices_total"],
        )
        assert [p.name for p in model.profiles] == [p["name"] for p in ref["profiles"]]
        for mine, theirs in zip(model.profiles, ref["profiles"]):
            assert mine.id == theirs["id"], (name, mine.name)
            assert mine.nvml_profile == theirs["nvml_profile_enum"]
            assert (mine.compute_slices, mine.memory_slices) == (theirs["compute_slices"], theirs["memory_slices"])
            assert mine.max_instances == theirs["max_instances"]
            assert list(mine.placement_starts) == theirs["placement_starts"], (name, mine.name)
            assert mine.placement_size == theirs["placement_size"]
            assert mine.memory_gb == theirs["memory_gb"]
            if theirs.get("memory_mib"):
                assert (mine.memory_mib, mine.memory_mib_estimated) == (theirs["memory_mib"], False)
            else:
                assert mine.memory_mib_estimated


def test_profile_ids_differ_between_families_and_are_looked_up_per_model():
    assert get_model("H100-80GB").profile("1g.10gb").id == 19
    assert get_model("A30-24GB").profile("1g.6gb").id == 14
    assert get_model("A100-40GB").profile(15).name == "1g.10gb"


def test_unknown_model_error_lists_every_known_model():
    with pytest.raises(UnknownGpuModel) as refused:
        get_model("H300-1TB")
    assert refused.value.field == "gpu_model" and refused.value.value == "H300-1TB"
    for name in REQUIRED:
        assert name in str(refused.value)


def test_model_names_are_case_insensitive():
    assert get_model("h100-80gb").name == "H100-80GB"


def test_unknown_profile_error_lists_the_models_profiles():
    with pytest.raises(UnknownProfile) as refused:
        get_model("A30-24GB").profile("3g.40gb")
    assert "1g.6gb, 1g.6gb+me, 2g.12gb, 2g.12gb+me, 4g.24gb" in str(refused.value)
    assert refused.value.gpu_model == "A30-24GB"


def test_nvml_device_names_identify_the_catalog_model():
    cat = catalog()
    assert cat.identify("NVIDIA H100 80GB HBM3", 81559).name == "H100-80GB"
    assert cat.identify("NVIDIA H100 NVL", 95830).name == "H100-94GB"
    assert cat.identify("NVIDIA A100-SXM4-40GB", 40960).name == "A100-40GB"
    assert cat.identify("NVIDIA A100 80GB PCIe", 81920).name == "A100-80GB"
    assert cat.identify("NVIDIA A30", 24576).name == "A30-24GB"
    assert cat.identify("NVIDIA H200", 143771).name == "H200-141GB"
    assert cat.identify("Tesla T4", 15360) is None


def test_importing_the_model_and_planner_pulls_in_no_redis_docker_or_nvml():
    code = (
        "import sys, prefect_mig.model, prefect_mig.model.layout, prefect_mig.repartition.planner;"
        "bad = {'redis', 'docker', 'pynvml', 'prefect'} & set(sys.modules);"
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
