"""The backend's contract suite through the real pynvml on the C NVML stub (`nvml_stub.c`), so the
ctypes marshalling of every call (pointer or value, versioned symbol, struct layout) runs in CI."""

from __future__ import annotations

import pytest

from prefect_mig.testing.backend_contract import GpuBackendContract

FLEETS = ["node-a=1xH100-80GB", "node-a=1xA30-24GB", "node-a=1xA100-40GB"]


class TestBackendOnNvmlStub(GpuBackendContract):
    @pytest.fixture(params=FLEETS)
    def nvml(self, request, make_nvml_stub):
        return make_nvml_stub(request.param).pynvml

    def attach_process(self, nvml, mig_uuid, pid):
        nvml.nvml_stub.attach_process(mig_uuid, pid)

    def detach_process(self, nvml, mig_uuid, pid):
        nvml.nvml_stub.detach_process(mig_uuid, pid)
