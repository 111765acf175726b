"""The backend's contract suite on the simulated NVML, plus what only a simulation can show."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from prefect_mig.errors import BackendError, MigDisabled, NvmlUnavailable
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.testing.backend_contract import GpuBackendContract

FLEETS = ["node-a=1xH100-80GB", "node-a=1xA30-24GB", "node-a=1xA100-40GB"]


class TestBackendOnSimulatedNvml(GpuBackendContract):
    @pytest.fixture(params=FLEETS)
    def nvml(self, request, tmp_path):
        return SimulatedNvml(request.param, state_dir=tmp_path)

    def attach_process(self, nvml, mig_uuid, pid):
        nvml.attach_process(mig_uuid, pid)

    def detach_process(self, nvml, mig_uuid, pid):
        nvml.detach_process(mig_uuid, pid)


@pytest.fixture
def sim(tmp_path):
    return SimulatedNvml("node-a=2xH100-80GB", state_dir=tmp_path)


def test_mig_disabled_gpu_is_reported_and_refuses_layout_calls(sim):
    with GpuBackend(sim) as backend:
        sim.nvmlDeviceSetMigMode(sim.nvmlDeviceGetHandleByIndex(1), sim.NVML_DEVICE_MIG_DISABLE)
        assert [g.mig_enabled for g in backend.gpus()] == [True, False]
        with pytest.raises(MigDisabled) as refused:
            backend.create(1, "1g.10gb", 0)
        assert "nvidia-smi -i 1 -mig 1" in str(refused.value)
        assert refused.value.gpu_uuid == backend.gpu(1).uuid


def test_a_gpu_index_that_does_not_exist_says_how_many_there_are(sim):
    with GpuBackend(sim) as backend, pytest.raises(NvmlUnavailable) as refused:
        backend.instances(5)
    assert "2 GPU(s)" in str(refused.value)


def test_a_failing_compute_instance_leaves_no_gpu_instance_behind(sim):
    def refuse(gpuInstance, profileId):
        raise sim.NVMLError(sim.NVML_ERROR_INSUFFICIENT_RESOURCES)

    sim.nvmlGpuInstanceCreateComputeInstance = refuse  # fault injection, as go-nvml's mocks allow
    with GpuBackend(sim) as backend:
        with pytest.raises(BackendError) as refused:
            backend.create(0, "3g.40gb", 0)
        assert "destroyed again" in str(refused.value)
        assert backend.instances(0) == []


def test_no_permission_is_explained(sim):
    def refuse(device, profileId, placement):
        raise sim.NVMLError(sim.NVML_ERROR_NO_PERMISSION)

    sim.nvmlDeviceCreateGpuInstanceWithPlacement = refuse
    with GpuBackend(sim) as backend, pytest.raises(BackendError) as refused:
        backend.create(0, "1g.10gb", 0)
    assert "needs root" in str(refused.value)


def test_backend_creates_in_one_process_and_lists_and_destroys_in_another(sim, tmp_path):
    prelude = textwrap.dedent(
        f"""
        from prefect_mig.gpu import GpuBackend, SimulatedNvml
        b = GpuBackend(SimulatedNvml({str(sim.fleet)!r}, state_dir={str(tmp_path)!r})).open()
        """
    )
    made = subprocess.run(
        [sys.executable, "-c", prelude + "m = b.create(1, '3g.40gb', 4); print(m.mig_uuid)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with GpuBackend(sim) as backend:
        (seen,) = backend.instances(1)
        assert (str(seen), seen.mig_uuid) == ("3g.40gb@4", made)
        backend.create(1, "2g.20gb", 0)
    listed = subprocess.run(
        [sys.executable, "-c", prelude + "print(b.layout(1)); b.destroy(1, b.instances(1)[-1].gpu_instance_id)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert listed == "2g.20gb@0 + 3g.40gb@4"
    with GpuBackend(sim) as backend:
        assert str(backend.layout(1)) == "2g.20gb@0"
