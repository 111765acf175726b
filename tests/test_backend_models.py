"""GPU models as the backend reads them through the real pynvml on the C NVML stub: renamed
variants map to their catalog family, and a GPU the catalog does not list is usable by the name the
backend gives it, with the geometry NVML reports."""

from __future__ import annotations

from prefect_mig.gpu import GpuBackend
from prefect_mig.model import Layout, get_model


def test_a_gpu_outside_the_catalog_gets_a_model_from_nvml_that_layouts_can_name(make_nvml_stub):
    stub = make_nvml_stub(
        "node-a=1xH100-80GB",
        device_names={0: "NVIDIA RTX PRO 6000 Blackwell Server Edition"},
        pci_device_ids={0: 0x2BB510DE},  # not listed in the catalog
    )
    with GpuBackend(stub.pynvml) as backend:
        assert backend.gpu(0).gpu_model is None  # not a catalog model
        model = backend.gpu_model(0)
        assert model.name == "RTX-PRO-6000-Blackwell-Server-Edition"
        assert "not in the catalog" in model.confidence
        assert get_model(model.name) is model
        assert {p.name for p in model.classic_profiles} >= {"1g.10gb", "3g.40gb", "7g.80gb"}
        target = Layout.parse(model.name, "3g.40gb@0 + 3g.40gb@4")
        backend.apply_layout(0, target)
        assert backend.layout(0).instances == target.instances


def test_renamed_variants_are_their_catalog_family(make_nvml_stub):
    stub = make_nvml_stub("node-a=1xH100-80GB+1xA100-80GB", device_names={0: "NVIDIA H800", 1: "NVIDIA A800-SXM4-80GB"})
    with GpuBackend(stub.pynvml) as backend:
        assert [g.gpu_model for g in backend.gpus()] == ["H100-80GB", "A100-80GB"]
        assert backend.gpu_model(0).name == "H100-80GB" and backend.gpu_model(0).confidence == "read from NVML"


def test_the_pci_device_id_names_the_model_when_the_driver_does_not_know_the_name(make_nvml_stub):
    stub = make_nvml_stub(
        "node-a=1xGH200-96GB", device_names={0: "NVIDIA Graphics Device"}, pci_device_ids={0: 0x232910DE}  # an H20
    )
    with GpuBackend(stub.pynvml) as backend:
        (gpu,) = backend.gpus()
        assert (gpu.gpu_model, gpu.pci_device_id) == ("GH200-96GB", 0x232910DE)
        assert backend.gpu_model(0).name == "GH200-96GB"
