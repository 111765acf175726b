"""The read-only part of the backend contract, on a real GPU; skipped where no NVIDIA driver answers.

It never changes the card: no MIG mode change, no instance created or destroyed."""

from __future__ import annotations

import pytest

from prefect_mig.gpu import nvml_available
from prefect_mig.testing.backend_contract import GpuBackendReadContract

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvml_available(), reason="no NVIDIA driver / GPU on this host"),
]


class TestBackendOnRealNvml(GpuBackendReadContract):
    @pytest.fixture
    def nvml(self):
        import pynvml

        return pynvml
