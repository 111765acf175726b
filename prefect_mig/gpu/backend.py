"""The one GPU backend: discovers GPUs and carves MIG instances through NVML.

It talks to any library with pynvml's interface: nvidia-ml-py's ``pynvml`` on a GPU host, or
`prefect_mig.gpu.simulated_nvml.SimulatedNvml` elsewhere. NVML errors become prefect-mig
exceptions (`prefect_mig.errors`) whose messages say what to do.

Profiles and placements are read from NVML, not from the catalog: the driver is the authority on
a real GPU. The catalog names the model (``H100-80GB``) when the device name matches one (renamed
variants included: A800, H800, H20) and keeps its instance counts (NVML misreports them on A30); a
GPU outside the catalog gets a model built from NVML alone, marked so (``built_from_nvml``, and its
``confidence``) and registered by name in this process (`prefect_mig.model.register_model`); the node
agent publishes it to Redis with the node's inventory, so the planner, requesters and
``prefect-mig status`` in other processes know it too.

Examples:
    ```python
    import tempfile
    from prefect_mig.gpu import GpuBackend, SimulatedNvml

    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tempfile.mkdtemp())
    with GpuBackend(nvml) as gpus:
        (gpu,) = gpus.gpus()
        slice_ = gpus.create(gpu.index, "3g.40gb", start=4)
        assert str(gpus.layout(gpu.index)) == "3g.40gb@4"
        gpus.destroy(gpu.index, slice_.gpu_instance_id)
    ```
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from prefect_mig.errors import (
    BackendError,
    InstanceBusy,
    InstanceNotFound,
    LayoutNotApplied,
    MigDisabled,
    NoPermission,
    NvmlUnavailable,
    PlacementConflict,
    PrefectMigError,
    ProfileNotSupported,
)
from prefect_mig.model import GpuModel, GpuProfile, Layout, Placement, catalog, creatable, register_model

_MIB = 1024 * 1024

#: NVML_COMPUTE_INSTANCE_PROFILE_* for a compute instance over a whole GI of N compute slices.
_CI_PROFILE_FOR_SLICES = {1: 0x0, 2: 0x1, 3: 0x2, 4: 0x3, 7: 0x4, 8: 0x5, 6: 0x6}


class GpuInfo(BaseModel):
    """One physical GPU as the backend sees it."""

    model_config = ConfigDict(frozen=True)

    index: int
    uuid: str
    device_name: str
    gpu_model: str | None  # catalog name, e.g. "H100-80GB"; None when the catalog has no match
    memory_total_mib: int
    pci_device_id: int | None = None  # (device << 16) | 0x10DE; names the model when the name does not
    mig_enabled: bool
    mig_pending: bool
    mig_supported: bool = True  # False: NVML answers that this GPU has no MIG at all (both modes read off)


class ProcessInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    pid: int
    used_memory_mib: int


class MigInstance(BaseModel):
    """One MIG device: a GPU instance with its compute instance, bound by `mig_uuid`."""

    model_config = ConfigDict(frozen=True)

    gpu_uuid: str
    gpu_index: int
    gpu_instance_id: int
    compute_instance_id: int | None
    profile: str
    profile_id: int
    start: int
    size: int
    mig_uuid: str | None  # None for a GPU instance without a compute instance (half-created)
    memory_mib: int

    @property
    def placement(self) -> Placement:
        return Placement(profile=self.profile, start=self.start)

    def __str__(self) -> str:
        return f"{self.profile}@{self.start}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _model_name(device_name: str) -> str:
    """A model name for a GPU outside the catalog: ``NVIDIA RTX PRO 6000`` -> ``RTX-PRO-6000``."""
    return "-".join(device_name.removeprefix("NVIDIA ").split())


_F = TypeVar("_F", bound=Callable[..., Any])

_LISTING_TRIES = 5  # an instance listing that a concurrent carve changed under it is taken again


def _nvml_errors(action: str) -> Callable[[_F], _F]:
    """Turn any NVML error that escapes the method into a typed prefect-mig error.

    `action` is formatted with the method's arguments: ``"list instances on GPU {0}"``.
    """

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def translated(self: GpuBackend, *args, **kw):
            try:
                return method(self, *args, **kw)
            except PrefectMigError:
                raise
            except Exception as exc:
                error = self._translate(exc, action.format(*args, **kw))
                if error is None:
                    raise
                raise error from exc

        return translated  # type: ignore[return-value]

    return wrap


class GpuBackend:
    """Discover GPUs, read and change MIG layouts, and list processes, through NVML.

    Args:
        nvml: the pynvml-compatible library; default: nvidia-ml-py's ``pynvml``.

    Use as a context manager (``nvmlInit`` / ``nvmlShutdown``), or call `open` and `close`.
    """

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self.nvml = nvml
        self._models: dict[int, GpuModel] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> GpuBackend:
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML could not start ({exc.__class__.__name__}): no NVIDIA driver here? Install the "
                "driver, or set PREFECT_MIG_BACKEND=simulated to use a simulated fleet.",
                nvml_code=getattr(exc, "value", None),
            ) from exc
        return self

    def close(self) -> None:
        self.nvml.nvmlShutdown()

    def __enter__(self) -> GpuBackend:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ discovery

    def _handle(self, index: int):
        count = self.nvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            raise NvmlUnavailable(
                f"gpu index {index} does not exist; this host has {count} GPU(s) (0..{count - 1})."
            )
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    @_nvml_errors("count GPUs")
    def gpu_count(self) -> int:
        return self.nvml.nvmlDeviceGetCount()

    @_nvml_errors("read the driver version")
    def driver_version(self) -> str:
        return _text(self.nvml.nvmlSystemGetDriverVersion())

    @_nvml_errors("read GPU {0}")
    def gpu(self, index: int) -> GpuInfo:
        h = self._handle(index)
        name = _text(self.nvml.nvmlDeviceGetName(h))
        total = self.nvml.nvmlDeviceGetMemoryInfo(h).total // _MIB
        supported = True
        try:
            current, pending = self.nvml.nvmlDeviceGetMigMode(h)
        except self.nvml.NVMLError_NotSupported:  # a GPU without MIG at all
            current = pending = 0
            supported = False
        try:
            pci = self.nvml.nvmlDeviceGetPciInfo(h).pciDeviceId
        except self.nvml.NVMLError:
            pci = None
        known = catalog().identify(name, total, pci_device_id=pci)
        return GpuInfo(
            index=index,
            uuid=_text(self.nvml.nvmlDeviceGetUUID(h)),
            device_name=name,
            gpu_model=known.name if known else None,
            memory_total_mib=total,
            pci_device_id=pci,
            mig_enabled=current == self.nvml.NVML_DEVICE_MIG_ENABLE,
            mig_pending=pending == self.nvml.NVML_DEVICE_MIG_ENABLE,
            mig_supported=supported,
        )

    def gpus(self) -> list[GpuInfo]:
        """Every GPU on this host, MIG-capable or not."""
        return [self.gpu(i) for i in range(self.gpu_count())]

    def _require_mig(self, index: int, h, *, mode_on: bool = True) -> str:
        """The GPU's UUID; MigDisabled if it has no MIG, or (with `mode_on`) MIG mode is off."""
        uuid = _text(self.nvml.nvmlDeviceGetUUID(h))
        try:
            current, _ = self.nvml.nvmlDeviceGetMigMode(h)
        except self.nvml.NVMLError_NotSupported as exc:
            raise MigDisabled(
                f"GPU {index} ({uuid}) does not support MIG.", gpu_uuid=uuid, nvml_code=exc.value
            ) from exc
        if mode_on and current != self.nvml.NVML_DEVICE_MIG_ENABLE:
            raise MigDisabled(
                f"MIG mode is off on GPU {index} ({uuid}); prefect-mig never switches it itself. "
                f"Enable it with `sudo nvidia-smi -i {index} -mig 1` (A100/A30 also need a GPU reset).",
                gpu_uuid=uuid,
            )
        return uuid

    @_nvml_errors("read the MIG profiles and placements of GPU {0}")
    def gpu_model(self, index: int) -> GpuModel:
        """The GPU's MIG geometry as NVML reports it: profiles, ids, sizes and placements."""
        if index in self._models:
            return self._models[index]
        h = self._handle(index)
        self._require_mig(index, h)
        model = self._read_model(index, h)
        if model.built_from_nvml:  # so layouts and requests in this process can name it
            register_model(model)
        self._models[index] = model
        return model

    @_nvml_errors("read the MIG profiles and placements of GPU {0}")
    def offered_model(self, index: int) -> GpuModel:
        """The MIG geometry NVML offers for the GPU, read whatever its MIG mode.

        The driver answers these reads with MIG mode off too (seen on an H100 80GB HBM3, driver
        580.159.04), so ``prefect-mig doctor`` compares them with the catalog before MIG is enabled.
        Nothing is cached or registered; carving and listing instances still need MIG on.

        Raises:
            MigDisabled: the GPU does not support MIG.
        """
        h = self._handle(index)
        self._require_mig(index, h, mode_on=False)
        return self._read_model(index, h)

    def _read_model(self, index: int, h) -> GpuModel:
        info = self.gpu(index)
        known = catalog().get(info.gpu_model) if info.gpu_model else None
        profiles: list[GpuProfile] = []
        for enum in range(self.nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                p = self.nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, enum)
            except (self.nvml.NVMLError_NotSupported, self.nvml.NVMLError_InvalidArgument):
                continue
            listed = next((k for k in known.profiles if k.id == p.id), None) if known else None
            if p.instanceCount == 0 and not listed:  # a listed profile's count may be misreported
                continue
            starts, size = self._placements(h, p.id)
            if not starts:
                continue
            name = _text(getattr(p, "name", b"")).removeprefix("MIG ")
            if not name and listed:
                name = listed.name
            profiles.append(
                GpuProfile(
                    id=p.id,
                    name=name or f"profile-{p.id}",
                    nvml_profile=enum,
                    compute_slices=p.sliceCount,
                    memory_slices=size,
                    memory_mib=p.memorySizeMB,
                    sm_count=p.multiprocessorCount or None,
                    # NVML misreports instanceCount on A30 (nvidia-mig-parted hard-codes it): a
                    # model the catalog lists keeps the catalog's count
                    max_instances=listed.max_instances if listed else p.instanceCount,
                    placement_starts=tuple(starts),
                    placement_size=size,
                )
            )
        if not profiles:
            raise BackendError(f"NVML lists no MIG profile on GPU {index} ({info.device_name}).", gpu_uuid=info.uuid)
        memory_slices = max(max(p.placement_starts) + p.placement_size for p in profiles)
        return GpuModel(
            name=known.name if known else _model_name(info.device_name),
            device_name=info.device_name,
            total_memory_mib=info.memory_total_mib,
            memory_slices=memory_slices,
            compute_slices=max(p.compute_slices for p in profiles),
            confidence="read from NVML" if known else "read from NVML (not in the catalog)",
            built_from_nvml=not known,
            profiles=tuple(profiles),
        )

    def _placements(self, h, profile_id: int) -> tuple[list[int], int]:
        count = ctypes.c_uint(0)
        self.nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, profile_id, None, ctypes.byref(count))
        array = (self.nvml.c_nvmlGpuInstancePlacement_t * max(count.value, 1))()
        self.nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, profile_id, array, ctypes.byref(count))
        starts = sorted(array[i].start for i in range(count.value))
        size = array[0].size if count.value else 0
        return starts, size

    # ------------------------------------------------------------------ layout

    def _gpu_instances(self, h, model: GpuModel) -> list[Any]:
        handles = []
        for p in model.profiles:
            count = ctypes.c_uint(0)
            # never fewer entries than instances can exist: the driver fills as many as there are
            array = (self.nvml.c_nvmlGpuInstance_t * max(p.max_instances, model.memory_slices))()
            self.nvml.nvmlDeviceGetGpuInstances(h, p.id, array, ctypes.byref(count))
            handles.extend(array[i] for i in range(count.value))
        return handles

    def _compute_instances(self, gi) -> list[Any]:
        found = []
        for enum in range(self.nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            try:
                info = self.nvml.nvmlGpuInstanceGetComputeInstanceProfileInfoV(
                    gi, enum, self.nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
                )
            except (self.nvml.NVMLError_NotSupported, self.nvml.NVMLError_InvalidArgument):
                continue
            count = ctypes.c_uint(0)
            array = (self.nvml.c_nvmlComputeInstance_t * 8)()
            self.nvml.nvmlGpuInstanceGetComputeInstances(gi, info.id, array, ctypes.byref(count))
            found.extend(array[i] for i in range(count.value))
        return found

    def _mig_uuids(self, h) -> dict[tuple[int, int], str]:
        """MIG device UUID per (GPU-instance id, compute-instance id)."""
        found = {}
        for i in range(self.nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mig = self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            except self.nvml.NVMLError_NotFound:
                continue
            key = (self.nvml.nvmlDeviceGetGpuInstanceId(mig), self.nvml.nvmlDeviceGetComputeInstanceId(mig))
            found[key] = _text(self.nvml.nvmlDeviceGetUUID(mig))
        return found

    @_nvml_errors("list the MIG instances of GPU {0}")
    def instances(self, index: int) -> list[MigInstance]:
        """The GPU's MIG instances, by start: placement, profile, compute instance and MIG UUID.

        A listing takes many NVML calls; an instance that another process (a node agent carving)
        destroys between two of them answers InvalidArgument or NotFound, and the listing is taken
        again (a few times) instead of failing a reader that only looked."""
        for attempt in range(1, _LISTING_TRIES):
            try:
                return self._instances_once(index)
            except (self.nvml.NVMLError_InvalidArgument, self.nvml.NVMLError_NotFound):
                time.sleep(0.05 * attempt)
        return self._instances_once(index)  # the last try's error is the one raised

    def _instances_once(self, index: int) -> list[MigInstance]:
        h = self._handle(index)
        gpu_uuid = self._require_mig(index, h)
        model = self.gpu_model(index)
        uuids = self._mig_uuids(h)
        found = []
        for gi in self._gpu_instances(h, model):
            info = self.nvml.nvmlGpuInstanceGetInfo(gi)
            profile = model.profile(int(info.profileId))
            cis = [self.nvml.nvmlComputeInstanceGetInfo(ci) for ci in self._compute_instances(gi)]
            ci_id = cis[0].id if cis else None
            found.append(
                MigInstance(
                    gpu_uuid=gpu_uuid,
                    gpu_index=index,
                    gpu_instance_id=info.id,
                    compute_instance_id=ci_id,
                    profile=profile.name,
                    profile_id=profile.id,
                    start=info.placement.start,
                    size=info.placement.size,
                    mig_uuid=uuids.get((info.id, ci_id)) if ci_id is not None else None,
                    memory_mib=profile.memory_mib,
                )
            )
        return sorted(found, key=lambda m: m.start)

    @_nvml_errors("read the layout of GPU {0}")
    def layout(self, index: int) -> Layout:
        """The GPU's current layout as a pure `Layout` value."""
        model = self.gpu_model(index)
        return Layout.of(model, (m.placement for m in self.instances(index)))

    # ------------------------------------------------------------------ changes

    @_nvml_errors("create {1}@{2} on GPU {0}")
    def create(self, index: int, profile: str, start: int) -> MigInstance:
        """Create a GPU instance of `profile` at memory slice `start`, and one compute instance over
        all of it. If the compute instance fails, the GPU instance is destroyed again.

        Raises:
            UnknownProfile: the GPU has no such profile (the message lists the ones it has).
            PlacementConflict: `start` is not a placement of the profile, or the range is taken.
            MigDisabled: MIG mode is off.
            NoPermission: the process may not create instances.
        """
        h = self._handle(index)
        gpu_uuid = self._require_mig(index, h)
        model = self.gpu_model(index)
        prof = model.profile(profile)
        if start not in prof.placement_starts:
            raise PlacementConflict(
                f"{prof.name} on GPU {index} may start only at memory slice "
                f"{', '.join(map(str, prof.placement_starts))}, not {start}.",
                profile=prof.name,
                start=start,
                gpu_uuid=gpu_uuid,
            )
        placement = self.nvml.c_nvmlGpuInstancePlacement_t()
        placement.start, placement.size = start, prof.placement_size
        try:
            # nvml.h: `const nvmlGpuInstancePlacement_t *placement`; pynvml passes it on unchanged
            gi = self.nvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, prof.id, ctypes.byref(placement))
        except self.nvml.NVMLError as exc:
            raise self._create_error(exc, index, gpu_uuid, model, prof, start) from exc
        try:
            self._create_ci(gi, prof)
        except self.nvml.NVMLError as exc:
            try:
                self.nvml.nvmlGpuInstanceDestroy(gi)  # leave no half-created instance behind
                left = "the GPU instance was destroyed again"
            except self.nvml.NVMLError as kept:  # e.g. DCGM holds it: say so, keep the first cause
                left = (
                    f"the GPU instance could not be destroyed again ({kept.__class__.__name__}), so it stays "
                    "without a compute instance (no MIG UUID, never leased) until the next layout change "
                    "repairs it"
                )
            raise BackendError(
                f"created {prof.name}@{start} on GPU {index} but its compute instance failed "
                f"({exc.__class__.__name__}); {left}.",
                gpu_uuid=gpu_uuid,
                nvml_code=exc.value,
            ) from exc
        gi_id = self.nvml.nvmlGpuInstanceGetInfo(gi).id
        return next(m for m in self.instances(index) if m.gpu_instance_id == gi_id)

    def _create_error(self, exc, index, gpu_uuid, model, prof, start) -> BackendError:
        code = exc.value
        if code == self.nvml.NVML_ERROR_INSUFFICIENT_RESOURCES:
            occupied = [m.placement for m in self.instances(index)]
            fits = sorted({str(p) for p in creatable(model, occupied) if p.profile == prof.name})
            return PlacementConflict(
                f"cannot create {prof.name}@{start} on GPU {index}: the range is taken or the "
                f"profile's instance limit is reached (layout now: "
                f"{Layout.of(model, occupied)}). {prof.name} fits at: {', '.join(fits) or 'nowhere'}.",
                profile=prof.name,
                start=start,
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        if code == self.nvml.NVML_ERROR_INVALID_ARGUMENT:
            return PlacementConflict(
                f"NVML refused {prof.name}@{start} on GPU {index} as an invalid placement.",
                profile=prof.name,
                start=start,
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        if code == self.nvml.NVML_ERROR_NOT_SUPPORTED:
            return ProfileNotSupported(
                f"GPU {index} does not support creating {prof.name}.",
                profile=prof.name,
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        return self._translate(exc, f"create {prof.name}@{start} on GPU {index}", gpu_uuid)

    def _translate(self, exc: BaseException, action: str, gpu_uuid: str | None = None) -> BackendError | None:
        """The typed error for an NVML failure while doing `action` (None: not an NVML error)."""
        mismatch = getattr(self.nvml, "NVMLLibraryMismatchError", None)
        if mismatch is not None and isinstance(exc, mismatch):
            return NvmlUnavailable(
                f"could not {action}: the NVIDIA driver is older than the installed nvidia-ml-py "
                f"({exc}). Upgrade the driver, or install the nvidia-ml-py release that matches it.",
                gpu_uuid=gpu_uuid,
            )
        if not isinstance(exc, self.nvml.NVMLError):
            return None
        code = exc.value
        if code == self.nvml.NVML_ERROR_NO_PERMISSION:
            return NoPermission(
                f"not allowed to {action}: reading MIG placements and instances, and changing them, "
                "needs root (or access to /proc/driver/nvidia/capabilities/mig/config and "
                "capabilities/mig/monitor). Run the agent as root; `prefect-mig doctor` checks this.",
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        if code == self.nvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            return NvmlUnavailable(
                f"could not {action}: the NVIDIA driver lacks the NVML function for it. prefect-mig "
                "needs driver R460 or newer (explicit MIG placements; R510+ for 4g+3g together); "
                "`prefect-mig doctor` shows the driver version.",
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        if code in (self.nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, self.nvml.NVML_ERROR_DRIVER_NOT_LOADED):
            return NvmlUnavailable(
                f"could not {action}: the NVML library and the loaded kernel driver differ "
                f"({exc.__class__.__name__}); a driver upgrade needs a reboot or a module reload.",
                gpu_uuid=gpu_uuid,
                nvml_code=code,
            )
        return BackendError(
            f"NVML failed to {action}: {exc.__class__.__name__} (code {code}).",
            gpu_uuid=gpu_uuid,
            nvml_code=code,
        )

    @_nvml_errors("list the processes on GPU {0}")
    def processes(self, index: int) -> dict[str, list[ProcessInfo]]:
        """Processes per MIG device UUID on the GPU (every MIG device appears, maybe with none)."""
        h = self._handle(index)
        self._require_mig(index, h)
        found: dict[str, list[ProcessInfo]] = {}
        for i in range(self.nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mig = self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            except self.nvml.NVMLError_NotFound:
                continue
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(mig)
            found[_text(self.nvml.nvmlDeviceGetUUID(mig))] = [
                ProcessInfo(pid=p.pid, used_memory_mib=(p.usedGpuMemory or 0) // _MIB) for p in procs
            ]
        return found

    @_nvml_errors("destroy GPU instance {1} on GPU {0}")
    def destroy(self, index: int, gpu_instance_id: int, *, expected: Placement | None = None) -> None:
        """Destroy a GPU instance and its compute instances, after checking no process runs on it.

        GPU instance ids are reused: after another process re-carved the GPU, an id read earlier
        may name another instance. With `expected` (the placement read with the id), an instance
        that is no longer that placement is left alone.

        Raises:
            InstanceNotFound: no GPU instance with that id (or it is not `expected` any more).
            InstanceBusy: processes run on it (checked first, and again by the driver).
        """
        h = self._handle(index)
        gpu_uuid = self._require_mig(index, h)
        target = next((m for m in self.instances(index) if m.gpu_instance_id == gpu_instance_id), None)
        if target is None or (expected is not None and target.placement != expected):
            now = "" if target is None else f" (it is now {target.placement}, not {expected}: re-carved elsewhere?)"
            raise InstanceNotFound(
                f"GPU {index} ({gpu_uuid}) has no GPU instance {gpu_instance_id}"
                + (f" holding {expected}" if expected is not None else "")
                + f"{now}; it may have been destroyed already. `prefect-mig gpus` shows the current layout.",
                gpu_instance_id=gpu_instance_id,
                gpu_uuid=gpu_uuid,
            )
        if target.mig_uuid:
            busy = self.processes(index).get(target.mig_uuid, [])
            if busy:
                raise self._busy(target, busy, gpu_uuid)
        gi = self.nvml.nvmlDeviceGetGpuInstanceById(h, gpu_instance_id)
        cis_gone = False
        try:
            for ci in self._compute_instances(gi):
                self.nvml.nvmlComputeInstanceDestroy(ci)
            cis_gone = True
            self.nvml.nvmlGpuInstanceDestroy(gi)
        except self.nvml.NVMLError as exc:
            # A GPU instance without a compute instance has no MIG UUID: never leasable again.
            repaired = self._repair(gi, target) if cis_gone else ""
            if exc.value == self.nvml.NVML_ERROR_IN_USE:
                busy = self.processes(index).get(target.mig_uuid or "", [])
                raise self._busy(target, busy, gpu_uuid, repaired) from exc
            error = self._translate(exc, f"destroy {target} on GPU {index}", gpu_uuid)
            error.args = (f"{error.args[0]}{repaired}",)
            raise error from exc

    def _repair(self, gi, target: MigInstance) -> str:
        """Give a GPU instance whose compute instances are gone one over all of it again; say so."""
        try:
            self._create_ci(gi, self.gpu_model(target.gpu_index).profile(target.profile))
        except self.nvml.NVMLError as exc:
            return (
                f" Its compute instance was destroyed and could not be re-created "
                f"({exc.__class__.__name__}): the next layout change re-creates it."
            )
        return " Its compute instance was re-created (with a new MIG UUID)."

    def _create_ci(self, gi, prof: GpuProfile) -> None:
        ci_info = self.nvml.nvmlGpuInstanceGetComputeInstanceProfileInfoV(
            gi,
            _CI_PROFILE_FOR_SLICES[prof.compute_slices],
            self.nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
        )
        self.nvml.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)

    @staticmethod
    def _busy(target: MigInstance, busy: list[ProcessInfo], gpu_uuid: str, note: str = "") -> InstanceBusy:
        if busy:
            holder = f"process(es) {', '.join(str(p.pid) for p in busy)}; stop them (or let their leases end)"
        else:
            holder = (
                "another NVML client (no process is listed: DCGM / nv-hostengine, dcgm-exporter, nvsm, "
                "or a process outside this PID namespace); stop it, as nvidia-mig-parted does,"
            )
        return InstanceBusy(
            f"{target} ({target.mig_uuid}) on GPU {target.gpu_index} is in use by {holder} before "
            f"destroying it.{note}",
            gpu_instance_id=target.gpu_instance_id,
            gpu_uuid=gpu_uuid,
        )

    @_nvml_errors("apply a layout to GPU {0}")
    def apply_layout(
        self, index: int, target: Layout, *, before_step: Callable[[], None] | None = None
    ) -> tuple[list[MigInstance], list[MigInstance]]:
        """Make the GPU's layout equal `target`: destroy what is not in it, create what is missing.

        The target is validated and every instance to destroy is checked for processes before
        anything changes, so bad input or a busy slice leaves the GPU as it was. Instances already
        in place are kept untouched (one that lost its compute instance gets one back, and is
        counted as created). If the driver refuses half-way (an NVML client that is no process,
        such as DCGM, holds an instance), what was done is undone and `LayoutNotApplied` says what
        changed. `before_step` is called before each destroy and create (each can take seconds on
        real NVML): what it raises stops the change there, as it is, without undoing anything (a
        node agent that lost its node to another agent must not carve on, nor roll back).
        Returns (destroyed, created).

        Raises:
            InvalidLayout / UnknownProfile: `target` is not a valid layout of this GPU.
            InstanceBusy: an instance that would go has processes; nothing was changed.
            LayoutNotApplied: the change stopped half-way; `.cause` says why, `.rolled_back`
                whether every instance is back (restored ones have new MIG UUIDs).
        """
        model = self.gpu_model(index)
        target.validate_on(model)
        current = self.instances(index)
        wanted = set(target.instances)
        doomed = [m for m in current if m.placement not in wanted]
        running = self.processes(index) if doomed else {}
        for m in doomed:
            if running.get(m.mig_uuid or ""):
                raise self._busy(m, running[m.mig_uuid], m.gpu_uuid)
        destroyed: list[MigInstance] = []
        created: list[MigInstance] = []
        step = before_step or (lambda: None)
        try:
            for m in doomed:
                step()
                self.destroy(index, m.gpu_instance_id, expected=m.placement)
                destroyed.append(m)
            have = {m.placement for m in current} - {m.placement for m in doomed}
            for p in target.instances:
                if p not in have:
                    step()
                    created.append(self.create(index, p.profile, p.start))
            for m in current:  # a kept GPU instance without compute instance gets one
                if m.placement in wanted and m.compute_instance_id is None:
                    step()
                    created.append(self._repair_kept(index, m))
        except BackendError as exc:
            if not destroyed and not created:
                raise  # nothing changed: the error as it is
            raise self._roll_back(index, exc, destroyed, created) from exc
        return destroyed, created

    @_nvml_errors("give {1} on GPU {0} its compute instance back")
    def _repair_kept(self, index: int, m: MigInstance) -> MigInstance:
        h = self.nvml.nvmlDeviceGetHandleByIndex(index)
        self._create_ci(self.nvml.nvmlDeviceGetGpuInstanceById(h, m.gpu_instance_id), self.gpu_model(index).profile(m.profile))
        return next(n for n in self.instances(index) if n.gpu_instance_id == m.gpu_instance_id)

    def _roll_back(
        self, index: int, cause: BackendError, destroyed: list[MigInstance], created: list[MigInstance]
    ) -> LayoutNotApplied:
        """Undo a half-applied layout (created ones go, destroyed ones come back); never raises."""
        problems = []
        for m in reversed(created):
            try:
                self.destroy(index, m.gpu_instance_id, expected=m.placement)
            except PrefectMigError as exc:
                problems.append(f"{m} could not be removed again ({exc})")
        for m in destroyed:
            try:
                self.create(index, m.profile, m.start)
            except PrefectMigError as exc:
                problems.append(f"{m} could not be restored ({exc})")
        undone = (
            f" The change was undone: {', '.join(map(str, destroyed)) or 'nothing'} restored (new MIG UUIDs), "
            f"{', '.join(map(str, created)) or 'nothing'} removed again."
            if not problems
            else f" Undoing it failed: {'; '.join(problems)}."
        )
        return LayoutNotApplied(
            f"the layout of GPU {index} was not applied: {cause} Before it stopped, "
            f"{', '.join(map(str, destroyed)) or 'nothing'} had been destroyed and "
            f"{', '.join(map(str, created)) or 'nothing'} created.{undone}",
            cause=cause,
            destroyed=[str(m) for m in destroyed],
            created=[str(m) for m in created],
            rolled_back=not problems,
            rollback_error="; ".join(problems) or None,
            gpu_uuid=cause.gpu_uuid,
        )
