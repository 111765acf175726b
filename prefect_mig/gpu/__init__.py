"""The GPU backend (NVML through nvidia-ml-py) and the simulated NVML it runs on without a GPU."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

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
    "default_gpu_runtime",
    "nvml_available",
    "resolve_backend",
]


@lru_cache(maxsize=1)
def nvml_available() -> bool:
    """True when a real NVML library and driver answer on this host (asked once per process)."""
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
    kind = resolve_backend(settings)
    if kind == "nvml":
        return GpuBackend()
    fleet = settings.fleet()
    if node is None:
        node = settings.node if settings.node in fleet.node_names else fleet.node_names[0]
    return GpuBackend(SimulatedNvml(fleet, node=node, state_dir=settings.state_dir))


def resolve_backend(settings: Settings) -> Literal["nvml", "simulated"]:
    """The backend ``settings.backend`` means here: ``auto`` is nvml when a driver answers."""
    if settings.backend == "auto":
        return "nvml" if nvml_available() else "simulated"
    return settings.backend


def default_gpu_runtime(settings: Settings) -> Literal["nvidia", "none"]:
    """How task containers get their GPU when nothing says otherwise: ``nvidia`` (a DeviceRequest
    for the slice's MIG UUID) whenever the backend is, or resolves to, real NVML; ``none`` only
    for the simulated fleet, which has no device to bind."""
    return "nvidia" if resolve_backend(settings) == "nvml" else "none"
