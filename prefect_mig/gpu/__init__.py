"""The GPU backend (NVML through nvidia-ml-py) and the simulated NVML it runs on without a GPU."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from prefect_mig.errors import ConfigError
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
    "fleet_node",
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
        node, _ = fleet_node(settings)
    return GpuBackend(SimulatedNvml(fleet, node=node, state_dir=settings.state_dir))


def fleet_node(settings: Settings) -> tuple[str, str | None]:
    """The simulated fleet's node this host is, when nothing names one: ``PREFECT_MIG_NODE``, else
    this host's name if the fleet has it, else the fleet's first node, with a line saying so (None
    otherwise) for the user to see.

    Raises:
        ConfigError: ``PREFECT_MIG_NODE`` names a node the fleet lacks (as ``--node`` does).
    """
    fleet = settings.fleet()
    names = fleet.node_names
    if settings.node in names:
        return settings.node, None
    if "node" in settings.model_fields_set:  # given, not this host's name by default
        raise ConfigError(
            f"PREFECT_MIG_NODE={settings.node!r}: not a node of the simulated fleet {fleet} "
            f"(PREFECT_MIG_SIMULATED_FLEET); nodes: {', '.join(names)}.", field="node", value=settings.node)
    return names[0], (
        f"serving {names[0]!r}, the simulated fleet's first node: this host's name, {settings.node!r}, is not a "
        f"node of the fleet ({', '.join(names)}); set PREFECT_MIG_NODE or pass --node to serve another.")


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
