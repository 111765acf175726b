"""The pure MIG model: GPU models, profiles, layouts and fleet specs.

Nothing here does I/O or imports Redis, Docker or NVML: the allocator, the planner and the GPU
backend all build on it.
"""

from prefect_mig.model.catalog import (
    CLASSIC_NVML_PROFILES,
    Catalog,
    GpuModel,
    GpuProfile,
    catalog,
    get_model,
    register_model,
)
from prefect_mig.model.fleet import FleetSpec, NodeSpec
from prefect_mig.model.layout import (
    Layout,
    Placement,
    creatable,
    creatable_profiles,
    enumerate_layouts,
    free_slices,
    is_valid_layout,
    render_bar,
    select_profiles,
    validate_layout,
)
from prefect_mig.model.profiles import (
    MigProfileName,
    ProfileName,
    SliceRequirement,
    parse_profile_name,
)

__all__ = [
    "CLASSIC_NVML_PROFILES",
    "Catalog",
    "FleetSpec",
    "GpuModel",
    "GpuProfile",
    "Layout",
    "MigProfileName",
    "NodeSpec",
    "Placement",
    "ProfileName",
    "SliceRequirement",
    "catalog",
    "creatable",
    "creatable_profiles",
    "enumerate_layouts",
    "free_slices",
    "get_model",
    "is_valid_layout",
    "parse_profile_name",
    "register_model",
    "render_bar",
    "select_profiles",
    "validate_layout",
]
