"""The GPU backend (NVML through nvidia-ml-py) and the simulated NVML it runs on without a GPU."""

from __future__ import annotations

from prefect_mig.gpu.backend import GpuBackend, GpuInfo, MigInstance, ProcessInfo
from prefect_mig.gpu.simulated_nvml import SimulatedNvml
from prefect_mig.settings import Settings

__all__ = [
    "GpuBackend",
    "GpuInfo",
    "MigInstance",
    "ProcessInfo",
    "SimulatedNvml",
    "backend_from_settings",
    "nvml_available",
]


def nvml_available() -> bool:
    """True when a real NVML library and driver answer on this host."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def backend_from_settings(settings: Settings, *, node: str | None = None) -> GpuBackend:
    """The backend the settings ask for: real NVML, or the simulated fleet's node `node`.

    With ``backend="auto"``, real NVML when a driver answers, else the simulated fleet. With the
    simulated backend, `node` (default: the settings' node if the fleet has it, else the fleet's
    first node) picks whose GPUs the backend sees.
    """
    kind = settings.backend
    if kind == "auto":
        kind = "nvml" if nvml_available() else "simulated"
    if kind == "nvml":
        return GpuBackend()
    fleet = settings.fleet()
    if node is None:
        node = settings.node if settings.node in fleet.node_names else fleet.node_names[0]
    return GpuBackend(SimulatedNvml(fleet, node=node, state_dir=settings.state_dir))
