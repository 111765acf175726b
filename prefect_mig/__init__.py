"""prefect-mig: priority-ordered, fenced leases on NVIDIA MIG slices for Prefect tasks.

Names are loaded on first use, so ``import prefect_mig.model`` stays free of NVML, Redis and
Docker.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("prefect-mig")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "AsyncLeaseClient": "prefect_mig.allocator",
    "FleetSpec": "prefect_mig.model",
    "Lease": "prefect_mig.allocator",
    "MigCluster": "prefect_mig.blocks",
    "LeaseClient": "prefect_mig.allocator",
    "MigTaskRunner": "prefect_mig.integrations.prefect",
    "mig": "prefect_mig.integrations.prefect.infra",
    "SliceRequest": "prefect_mig.allocator",
    "task": "prefect_mig.integrations.prefect",
    "GpuBackend": "prefect_mig.gpu",
    "Layout": "prefect_mig.model",
    "Placement": "prefect_mig.model",
    "PrefectMigError": "prefect_mig.errors",
    "Settings": "prefect_mig.settings",
    "SimulatedNvml": "prefect_mig.gpu",
    "SliceRequirement": "prefect_mig.model",
    "get_model": "prefect_mig.model",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefect_mig' has no attribute {name!r}")
