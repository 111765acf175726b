"""The catalog agrees with the reference tables, and the pure model imports nothing impure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_mig.errors import ConfigError, UnknownGpuModel, UnknownProfile
from prefect_mig.model import catalog, get_model, register_model

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "mig-profiles.json"
#: Where the catalog knowingly differs from the reference table: real `nvidia-smi mig -lgip`
#: listings of A100-80GB show 1g.10gb at 9.50 GiB (twice A100-40GB's 1g.5gb, 4,864 MiB).
CORRECTED_MIB = {("A100-80GB", "1g.10gb"): 9728, ("A100-80GB", "1g.10gb+me"): 9728}
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
            if (name, mine.name) in CORRECTED_MIB:
                assert mine.memory_mib == CORRECTED_MIB[name, mine.name]
            elif theirs.get("memory_mib"):
                assert (mine.memory_mib, mine.memory_mib_estimated) == (theirs["memory_mib"], False)
            else:
                assert mine.memory_mib_estimated


def test_profiles_on_the_same_memory_slices_have_the_same_memory():
    for model in catalog().models.values():
        by_slices: dict[int, set[int]] = {}
        for p in model.profiles:
            by_slices.setdefault(p.memory_slices, set()).add(p.memory_mib)
        assert all(len(sizes) == 1 for sizes in by_slices.values()), (model.name, by_slices)


def test_pci_device_ids_match_the_reference_and_identify_the_model_whatever_the_name(reference):
    for name, ref in reference.items():
        ids = {int(i, 16) for entry in ref.get("pci_device_ids", []) for i in re.findall(r"0x[0-9A-Fa-f]{8}", entry)}
        assert set(get_model(name).pci_device_ids) == ids, name
    cat = catalog()
    # a driver that does not know the marketing name says "NVIDIA Graphics Device"
    assert cat.identify("NVIDIA Graphics Device", 97871, pci_device_id=0x232910DE).name == "GH200-96GB"  # H20
    assert cat.identify("NVIDIA Graphics Device", 81920, pci_device_id=0x20F310DE).name == "A100-80GB"  # A800
    assert cat.identify("NVIDIA Graphics Device", 81559, pci_device_id=0x232210DE).name == "H100-80GB"  # H800
    assert cat.identify("NVIDIA Graphics Device", 81559, pci_device_id=0x12345678) is None


def test_a_model_read_from_nvml_can_be_registered_and_is_then_known_by_name():
    base = get_model("H100-80GB")
    odd = base.model_copy(update={"name": "RTX-PRO-6000-Test", "confidence": "read from NVML (not in the catalog)"})
    register_model(odd)
    assert get_model("rtx-pro-6000-test") is odd
    assert "RTX-PRO-6000-Test" not in catalog().models  # the shipped catalog stays as it is
    with pytest.raises(ConfigError):
        register_model(base.model_copy(update={"name": "H100-80GB", "confidence": "read from NVML"}))


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


@pytest.mark.parametrize(
    ("device_name", "memory_mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
        ("NVIDIA H100 NVL", 95830, "H100-94GB"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA A30", 24576, "A30-24GB"),
        ("NVIDIA H200", 143771, "H200-141GB"),  # H20 below must not swallow H200
        ("Tesla T4", 15360, None),
        # renamed and export variants share their family's MIG geometry
        ("NVIDIA A800-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A800 40GB Active", 40960, "A100-40GB"),
        ("NVIDIA H800", 81559, "H100-80GB"),
        ("NVIDIA H800 NVL", 95830, "H100-94GB"),
        ("NVIDIA H20", 97871, "GH200-96GB"),
    ],
)
def test_nvml_device_names_identify_the_catalog_model(device_name, memory_mib, expected):
    found = catalog().identify(device_name, memory_mib)
    assert (found.name if found else None) == expected


def test_importing_the_model_and_planner_pulls_in_no_redis_docker_or_nvml():
    code = (
        "import sys, prefect_mig.model, prefect_mig.model.layout, prefect_mig.repartition.planner;"
        "bad = {'redis', 'docker', 'pynvml', 'prefect'} & set(sys.modules);"
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
