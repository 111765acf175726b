"""A simulated NVML with pynvml's interface, for machines without a GPU.

It offers the part of nvidia-ml-py's ``pynvml`` that prefect-mig's GPU backend calls, with the same
signatures, constants, ctypes structures and ``NVMLError_*`` exception classes (re-exported from
pynvml itself), backed by the MIG catalog. So the code that carves real GPUs is the code CI runs,
the way NVIDIA's go-nvml ships mock GPUs.

The hardware comes from a fleet spec (``node-a=2xH100-80GB,node-b=1xA30-24GB``); one instance sees
the GPUs of one node. The state lives in a JSON file under the state dir, guarded by an exclusive
``flock``, so separate processes (an agent, the CLI, a test) see the same simulated hardware.

It refuses what the driver refuses:

| call | refused with |
|---|---|
| create a GPU instance that overlaps one, exceeds the profile's count, or a second ``+me`` | ``NVMLError_InsufficientResources`` |
| create at a start that is not one of the profile's placements | ``NVMLError_InvalidArgument`` |
| create a GPU instance while MIG mode is off (nvml.h) | ``NVMLError_NotSupported`` |
| a profile id the GPU lacks (placements, remaining capacity, instance listing) | ``NVMLError_InvalidArgument`` |
| profile info of an enum the GPU lacks / from enum 17 on | ``NVMLError_NotSupported`` / ``NVMLError_InvalidArgument`` |
| destroy a compute instance with processes, a GPU instance with compute instances or processes | ``NVMLError_InUse`` |
| disable MIG mode while GPU instances exist | ``NVMLError_InUse`` |
| a handle whose instance was destroyed (stale) | ``NVMLError_InvalidArgument`` |
| a placement structure passed by value instead of ``ctypes.byref`` (the C ABI takes a pointer) | ``TypeError`` |

With MIG mode off the reads answer as seen on a real H100 80GB HBM3, driver 580.159.04, 2026-11-27:
profile info, placements and remaining capacity as with MIG on, ``nvmlDeviceGetGpuInstances`` a
count of 0, ``nvmlDeviceGetGpuInstanceById`` and ``nvmlDeviceGetMigDeviceHandleByIndex``
``NVMLError_NotFound``, ``nvmlDeviceGetMaxMigDeviceCount`` 0.

Not modelled, because prefect-mig never calls them: compute-instance placements
(``nvmlGpuInstanceGetComputeInstancePossiblePlacements``,
``nvmlGpuInstanceCreateComputeInstanceWithPlacement``: the backend gives each GPU instance its one
full compute instance with ``nvmlGpuInstanceCreateComputeInstance``), and the MIG-mode change of
A100/A30 that stays pending until a GPU reset: ``nvmlDeviceSetMigMode`` here applies at once, as on
Hopper, for tests that set a mode up; prefect-mig only reads the current and pending modes
(``prefect-mig doctor`` reports a pending change) and never sets them. Whoever makes the backend
call either must model it here first. Tests leave a change pending with `stage_mig_mode`.

Tests attach fake processes to a MIG device with `attach_process` / `detach_process`, and inject a
fault by overriding one method on an instance (``sim.nvmlGpuInstanceDestroy = failing``).

Examples:
    ```python
    import tempfile
    from prefect_mig.gpu.simulated_nvml import SimulatedNvml

    nvml = SimulatedNvml("node-a=1xA30-24GB", node="node-a", state_dir=tempfile.mkdtemp())
    nvml.nvmlInit()
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetName(gpu) == "NVIDIA A30"
    assert nvml.nvmlDeviceGetMigMode(gpu) == [1, 1]
    ```
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import inspect
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynvml

from prefect_mig.model import FleetSpec, GpuModel, get_model
from prefect_mig.state_dir import open_private, private_dir, write_private

# Constants, structures and error classes are pynvml's own, so `except pynvml.NVMLError_InUse`
# behaves the same against either library.
_EXPORTED = [
    name
    for name in dir(pynvml)
    if name.startswith(("NVML_", "NVMLError", "c_nvml", "nvmlFriendlyObject", "nvmlGpuInstanceProfileInfo_v2", "nvmlComputeInstanceProfileInfo_v2"))
]
globals().update({name: getattr(pynvml, name) for name in _EXPORTED})
NVMLError = pynvml.NVMLError

_MIB = 1024 * 1024
_HANDLE_TAG = 0x51
_KIND_GPU, _KIND_GI, _KIND_CI, _KIND_MIG = 1, 2, 3, 4
#: NVML_COMPUTE_INSTANCE_PROFILE_* for a compute instance spanning a whole GI of N compute slices.
_CI_PROFILE_FOR_SLICES = {1: 0x0, 2: 0x1, 3: 0x2, 4: 0x3, 7: 0x4, 8: 0x5, 6: 0x6}
#: GPU-instance profile enums the driver knows: 580.159.04 answers InvalidArgument from 17 on, though
#: nvidia-ml-py's NVML_GPU_INSTANCE_PROFILE_COUNT may be larger.
_DRIVER_PROFILE_COUNT = 17
#: (copy, decoder, encoder, JPEG, OFA) engines per GPU-instance profile as a real GPU reports them in
#: nvmlGpuInstanceProfileInfo: seen on an H100 80GB HBM3, driver 580.159.04.
_ENGINES_SEEN = {
    "H100-80GB": {
        "1g.10gb": (1, 1, 0, 1, 0), "1g.10gb+me": (1, 1, 0, 1, 1), "1g.20gb": (1, 1, 0, 1, 0),
        "2g.20gb": (2, 2, 0, 2, 0), "3g.40gb": (3, 3, 0, 3, 0), "4g.40gb": (4, 4, 0, 4, 0), "7g.80gb": (8, 7, 0, 7, 1),
    },
}
#: Copy engines per profile as NVIDIA's MIG user guide lists them (shared/reference/mig-profiles.json).
_COPY_ENGINES_LISTED = {
    "B200-180GB": {"1g.23gb": 2, "1g.23gb+me": 2, "1g.45gb": 2, "2g.45gb": 3, "3g.90gb": 6, "4g.90gb": 8, "7g.180gb": 16},
}


def profile_engine_counts(model: GpuModel, profile: str) -> tuple[int, int, int, int, int]:
    """The (copy, decoder, encoder, JPEG, OFA) engine counts the fakes report for GPU-instance
    profile `profile` of `model` in ``nvmlGpuInstanceProfileInfo``.

    For an H100-80GB they are those a real one reported (driver 580.159.04). No other model was
    seen, so the rest are stand-ins, not the driver's numbers: one copy engine per compute slice
    (for a B200-180GB, those the MIG user guide lists), and one decoder, encoder, JPEG decoder and
    OFA for a ``+me`` profile, none otherwise.

    Examples:
        ```python
        from prefect_mig.gpu.simulated_nvml import profile_engine_counts
        from prefect_mig.model import get_model

        assert profile_engine_counts(get_model("H100-80GB"), "7g.80gb") == (8, 7, 0, 7, 1)
        ```
    """
    if profile in _ENGINES_SEEN.get(model.name, {}):
        return _ENGINES_SEEN[model.name][profile]
    p = model.profile(profile)
    media = int(p.media_engines)
    return _COPY_ENGINES_LISTED.get(model.name, {}).get(profile, p.compute_slices), media, media, media, media


def _raise(code: int) -> None:
    raise pynvml.NVMLError(code)


def _pointed_to(ref: Any, struct: type) -> Any:
    """The structure behind a ``const T *`` argument, refusing what the C ABI would not take.

    pynvml sets no ``argtypes``, so a structure passed as is goes *by value*: the driver reads its
    bytes as an address and crashes. Only ``ctypes.byref(s)`` or ``ctypes.pointer(s)`` is a pointer.
    """
    if isinstance(ref, ctypes._Pointer) and isinstance(ref.contents, struct):
        return ref.contents
    if type(ref).__name__ == "CArgObject" and isinstance(getattr(ref, "_obj", None), struct):
        return ref._obj
    raise TypeError(
        f"expected a pointer to {struct.__name__} (ctypes.byref(...)), got {type(ref).__name__}: a "
        "structure passed by value reaches NVML as a bogus address"
    )


class SimulatedNvml:
    """pynvml's functions over simulated GPUs (one node of a fleet), state shared across processes.

    Args:
        fleet: a fleet spec string or `FleetSpec`.
        node: the node whose GPUs this library shows (default: the fleet's first node).
        state_dir: directory of the shared state file (created if missing).
        driver_version: what ``nvmlSystemGetDriverVersion`` reports.
        change_delay_s: how long each create or destroy of a GPU or compute instance takes before
            it lands (default none). The real driver takes up to seconds per call, so a whole carve
            can outlast a heartbeat TTL; tests set it to see what a slow carve does.
    """

    def __init__(
        self,
        fleet: FleetSpec | str,
        *,
        node: str | None = None,
        state_dir: str | os.PathLike,
        driver_version: str = "570.133.20",
        change_delay_s: float = 0.0,
    ) -> None:
        self.fleet = fleet if isinstance(fleet, FleetSpec) else FleetSpec.parse(fleet)
        self.node = node or self.fleet.node_names[0]
        self._models: list[GpuModel] = [get_model(m) for m in self.fleet.gpu_models(self.node)]
        digest = hashlib.sha1(str(self.fleet).encode()).hexdigest()[:12]
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / f"simulated-nvml-{digest}.json"
        self.driver_version = driver_version
        self.change_delay_s = change_delay_s
        self._initialized = 0
        self._cache: tuple[tuple, dict] | None = None

    # ------------------------------------------------------------------ state file

    @contextmanager
    def _state(self, *, write: bool = False) -> Iterator[dict]:
        if not self._initialized:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        if not write:
            # every write replaces the whole file at once (os.replace), so a read needs no lock: it
            # sees the state before or after a write, never half of one (and reads are most calls)
            yield self._load(fresh=False)
            return
        private_dir(self.state_dir, private=False)
        with open_private(self.state_path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            state = self._load(fresh=write)
            yield state
            if write:
                self._cache = None
                write_private(self.state_path, json.dumps(state))  # one os.replace: readers see all or none

    def _load(self, *, fresh: bool = True) -> dict:
        """The state; reads reuse the last parse while the file is the same one (every write
        replaces the file, so a new inode or mtime means another process or call changed it).
        Callers never mutate a state they read without `write`."""
        try:
            st = os.stat(self.state_path)
        except FileNotFoundError:
            return self._fresh_state()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not fresh and self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        state = json.loads(self.state_path.read_text())
        if not fresh:
            self._cache = (stamp, state)
        return state

    def _fresh_state(self) -> dict:
        gpus = {}
        for node in self.fleet.nodes:
            for index, model in enumerate(node.gpus):
                key = f"{node.name}/{index}"
                gpus[key] = {
                    "uuid": "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"prefect-mig:{self.fleet}:{key}")),
                    "model": model,
                    "mig_mode": 1,
                    "pending_mig_mode": 1,
                    "gis": {},
                }
        return {"fleet": str(self.fleet), "next_serial": 1, "gpus": gpus}

    def _gpu(self, state: dict, index: int) -> dict:
        return state["gpus"][f"{self.node}/{index}"]

    # ------------------------------------------------------------------ handles

    @staticmethod
    def _encode(kind: int, gpu: int, serial: int = 0, ci: int = 0) -> int:
        return (_HANDLE_TAG << 56) | (kind << 52) | (gpu << 44) | (serial << 12) | ci

    def _handle(self, ctype, kind: int, gpu: int, serial: int = 0, ci: int = 0):
        return ctypes.cast(ctypes.c_void_p(self._encode(kind, gpu, serial, ci)), ctype)

    @staticmethod
    def _decode(handle) -> tuple[int, int, int, int]:
        try:
            value = ctypes.cast(handle, ctypes.c_void_p).value or 0
        except ctypes.ArgumentError:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if value >> 56 != _HANDLE_TAG:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return (value >> 52) & 0xF, (value >> 44) & 0xFF, (value >> 12) & 0xFFFFFFFF, value & 0xFFF

    def _device(self, state: dict, handle, *, mig_ok: bool = False) -> tuple[int, dict, dict | None, dict | None]:
        """(gpu index, gpu record, gi record, ci record) of a device or MIG device handle."""
        kind, gpu, serial, ci = self._decode(handle)
        if kind not in ((_KIND_GPU, _KIND_MIG) if mig_ok else (_KIND_GPU,)):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu >= len(self._models):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        record = self._gpu(state, gpu)
        if kind == _KIND_GPU:
            return gpu, record, None, None
        gi = self._gi_by_serial(record, serial)
        ci_rec = gi["cis"].get(str(ci))
        if ci_rec is None:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu, record, gi, ci_rec

    @staticmethod
    def _gi_by_serial(record: dict, serial: int) -> dict:
        for gi in record["gis"].values():
            if gi["serial"] == serial:
                return gi
        _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # stale handle: the instance is gone
        raise AssertionError  # unreachable

    def _gi(self, state: dict, handle) -> tuple[int, dict, dict]:
        kind, gpu, serial, _ = self._decode(handle)
        if kind != _KIND_GI or gpu >= len(self._models):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        record = self._gpu(state, gpu)
        return gpu, record, self._gi_by_serial(record, serial)

    def _ci(self, state: dict, handle) -> tuple[int, dict, dict, dict]:
        kind, gpu, serial, ci = self._decode(handle)
        if kind != _KIND_CI or gpu >= len(self._models):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        record = self._gpu(state, gpu)
        gi = self._gi_by_serial(record, serial)
        ci_rec = gi["cis"].get(str(ci))
        if ci_rec is None:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu, record, gi, ci_rec

    def _model_profile_by_enum(self, gpu: int, profile: int):
        if not 0 <= profile < _DRIVER_PROFILE_COUNT:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for p in self._models[gpu].profiles:
            if p.nvml_profile == profile:
                return p
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _model_profile_by_id(self, gpu: int, profile_id: int):
        for p in self._models[gpu].profiles:
            if p.id == profile_id:
                return p
        _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    @staticmethod
    def _require_mig(record: dict) -> None:
        if record["mig_mode"] != pynvml.NVML_DEVICE_MIG_ENABLE:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # ------------------------------------------------------------------ library and devices

    def nvmlInit(self):
        self._initialized += 1
        with self._state(write=True):
            pass  # creates the state file on first use
        return None

    def nvmlShutdown(self):
        if not self._initialized:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        self._initialized -= 1
        return None

    def nvmlSystemGetDriverVersion(self):
        with self._state():
            return self.driver_version

    def nvmlDeviceGetCount(self):
        with self._state():
            return len(self._models)

    def nvmlDeviceGetHandleByIndex(self, index):
        with self._state():
            if not 0 <= int(index) < len(self._models):
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return self._handle(pynvml.c_nvmlDevice_t, _KIND_GPU, int(index))

    def nvmlDeviceGetIndex(self, handle):
        with self._state() as state:
            return self._device(state, handle)[0]

    def nvmlDeviceGetName(self, handle):
        with self._state() as state:
            gpu, _, gi, _ = self._device(state, handle, mig_ok=True)
            name = self._models[gpu].device_name
            if gi is not None:
                name += " MIG " + self._model_profile_by_id(gpu, gi["profile_id"]).name
            return name

    def nvmlDeviceGetUUID(self, handle):
        with self._state() as state:
            _, record, gi, ci = self._device(state, handle, mig_ok=True)
            return record["uuid"] if ci is None else ci["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        with self._state() as state:
            gpu, record, gi, ci = self._device(state, handle, mig_ok=True)
            if gi is None:
                total = self._models[gpu].total_memory_mib * _MIB
                procs = [p for g in record["gis"].values() for c in g["cis"].values() for p in c["processes"]]
            else:
                total = self._model_profile_by_id(gpu, gi["profile_id"]).memory_mib * _MIB
                procs = [p for c in gi["cis"].values() for p in c["processes"]]
            used = min(total, sum(p["used_memory_mib"] for p in procs) * _MIB)
            mem = pynvml.c_nvmlMemory_t()
            mem.total, mem.used, mem.free = total, used, total - used
            return mem

    def nvmlDeviceGetPciInfo(self, handle):
        with self._state() as state:
            gpu, _, _, _ = self._device(state, handle)
            info = pynvml.nvmlPciInfo_t()
            info.pciDeviceId = (self._models[gpu].pci_device_ids or (0,))[0]
            info.bus, info.busId = gpu + 1, f"00000000:{gpu + 1:02X}:00.0".encode()
            return info

    def nvmlDeviceGetMigMode(self, device):
        with self._state() as state:
            _, record, _, _ = self._device(state, device)
            return [record["mig_mode"], record["pending_mig_mode"]]

    def nvmlDeviceSetMigMode(self, device, mode):
        with self._state(write=True) as state:
            _, record, _, _ = self._device(state, device)
            if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if mode == pynvml.NVML_DEVICE_MIG_DISABLE and record["gis"]:
                _raise(pynvml.NVML_ERROR_IN_USE)
            record["mig_mode"] = record["pending_mig_mode"] = mode  # Hopper: no reset needed
            return pynvml.NVML_SUCCESS

    def nvmlDeviceIsMigDeviceHandle(self, device):
        with self._state():  # refuses before nvmlInit, like the driver
            return int(self._decode(device)[0] == _KIND_MIG)

    # ------------------------------------------------------------------ GPU-instance profiles

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device, profile, version=2):
        with self._state() as state:
            gpu, _, _, _ = self._device(state, device)
            p = self._model_profile_by_enum(gpu, profile)
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t() if version == 2 else pynvml.c_nvmlGpuInstanceProfileInfo_t()
            info.id = p.id
            info.isP2pSupported = 0
            info.sliceCount = p.compute_slices
            info.instanceCount = p.max_instances
            info.multiprocessorCount = p.sm_count or 0
            (info.copyEngineCount, info.decoderCount, info.encoderCount, info.jpegCount,
             info.ofaCount) = profile_engine_counts(self._models[gpu], p.name)
            info.memorySizeMB = p.memory_mib
            if version == 2:
                info.name = f"MIG {p.name}".encode()  # as nvidia-smi -lgip shows it
            return info

    nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo

    def nvmlDeviceGetGpuInstancePossiblePlacements(self, device, profileId, placementsRef, countRef):
        with self._state() as state:
            gpu, _, _, _ = self._device(state, device)
            p = self._model_profile_by_id(gpu, profileId)
            count = ctypes.cast(countRef, ctypes.POINTER(ctypes.c_uint)).contents
            if placementsRef is None:
                count.value = len(p.placement_starts)
                return pynvml.NVML_SUCCESS
            if count.value < len(p.placement_starts):
                count.value = len(p.placement_starts)
                _raise(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
            for i, start in enumerate(p.placement_starts):
                placementsRef[i].start = start
                placementsRef[i].size = p.placement_size
            count.value = len(p.placement_starts)
            return pynvml.NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, device, profileId):
        with self._state() as state:
            gpu, record, _, _ = self._device(state, device)
            p = self._model_profile_by_id(gpu, profileId)
            return self._capacity(gpu, record, p)

    def _occupied(self, record: dict) -> int:
        mask = 0
        for gi in record["gis"].values():
            mask |= ((1 << gi["size"]) - 1) << gi["start"]
        return mask

    def _refusal(self, gpu: int, record: dict, p, start: int) -> int | None:
        """The NVML error creating `p` at `start` would get now, or None if it would succeed."""
        if start not in p.placement_starts:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        if self._occupied(record) & (((1 << p.placement_size) - 1) << start):
            return pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
        same = sum(1 for gi in record["gis"].values() if gi["profile_id"] == p.id)
        if same >= p.max_instances:
            return pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
        if p.media_engines and any(
            self._model_profile_by_id(gpu, gi["profile_id"]).media_engines for gi in record["gis"].values()
        ):
            return pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
        return None

    def _capacity(self, gpu: int, record: dict, p) -> int:
        """How many more instances of `p` fit, placing greedily from the lowest free start."""
        mask = self._occupied(record)
        same = sum(1 for gi in record["gis"].values() if gi["profile_id"] == p.id)
        media_taken = any(self._model_profile_by_id(gpu, gi["profile_id"]).media_engines for gi in record["gis"].values())
        n = 0
        for start in p.placement_starts:
            bits = ((1 << p.placement_size) - 1) << start
            if mask & bits or same + n >= p.max_instances or (p.media_engines and (media_taken or n)):
                continue
            mask |= bits
            n += 1
        return n

    # ------------------------------------------------------------------ GPU instances

    def _take_time(self) -> None:
        """A create or destroy lands `change_delay_s` after it was called (outside the state lock:
        reads and other processes go on meanwhile, as with the driver)."""
        if self.change_delay_s > 0:
            time.sleep(self.change_delay_s)

    def nvmlDeviceCreateGpuInstanceWithPlacement(self, device, profileId, placement):
        placement = _pointed_to(placement, pynvml.c_nvmlGpuInstancePlacement_t)
        self._take_time()
        with self._state(write=True) as state:
            gpu, record, _, _ = self._device(state, device)
            self._require_mig(record)
            p = self._model_profile_by_id(gpu, profileId)
            if placement.size != p.placement_size:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            refusal = self._refusal(gpu, record, p, placement.start)
            if refusal is not None:
                _raise(refusal)
            gi_id = next(i for i in range(1, 64) if str(i) not in record["gis"])
            serial = state["next_serial"]
            state["next_serial"] += 1
            record["gis"][str(gi_id)] = {
                "id": gi_id,
                "serial": serial,
                "profile_id": p.id,
                "start": placement.start,
                "size": p.placement_size,
                "cis": {},
            }
            return self._handle(pynvml.c_nvmlGpuInstance_t, _KIND_GI, gpu, serial)

    def nvmlDeviceGetGpuInstances(self, device, profileId, gpuInstancesRef, countRef):
        with self._state() as state:
            gpu, record, _, _ = self._device(state, device)
            self._model_profile_by_id(gpu, profileId)
            found = sorted((gi for gi in record["gis"].values() if gi["profile_id"] == profileId), key=lambda g: g["id"])
            count = ctypes.cast(countRef, ctypes.POINTER(ctypes.c_uint)).contents
            for i, gi in enumerate(found):
                gpuInstancesRef[i] = self._handle(pynvml.c_nvmlGpuInstance_t, _KIND_GI, gpu, gi["serial"])
            count.value = len(found)
            return pynvml.NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, device, gpuInstanceId):
        with self._state() as state:
            gpu, record, _, _ = self._device(state, device)
            gi = record["gis"].get(str(gpuInstanceId))
            if gi is None:
                _raise(pynvml.NVML_ERROR_NOT_FOUND)
            return self._handle(pynvml.c_nvmlGpuInstance_t, _KIND_GI, gpu, gi["serial"])

    def nvmlGpuInstanceGetInfo(self, gpuInstance):
        with self._state() as state:
            gpu, _, gi = self._gi(state, gpuInstance)
            info = pynvml.c_nvmlGpuInstanceInfo_t()
            info.device = self._handle(pynvml.c_nvmlDevice_t, _KIND_GPU, gpu)
            info.id = gi["id"]
            info.profileId = gi["profile_id"]
            info.placement.start = gi["start"]
            info.placement.size = gi["size"]
            return info

    def nvmlGpuInstanceDestroy(self, gpuInstance):
        self._take_time()
        with self._state(write=True) as state:
            _, record, gi = self._gi(state, gpuInstance)
            if gi["cis"]:
                _raise(pynvml.NVML_ERROR_IN_USE)
            del record["gis"][str(gi["id"])]
            return pynvml.NVML_SUCCESS

    # ------------------------------------------------------------------ compute instances

    def _ci_profile(self, gpu: int, gi: dict, profile: int):
        """(compute slices, id) of compute-instance profile enum `profile` inside `gi`."""
        slices = self._model_profile_by_id(gpu, gi["profile_id"]).compute_slices
        for n, enum in _CI_PROFILE_FOR_SLICES.items():
            # the driver offers a CI over the whole GI, and 1c/2c (3c/4c on a 7g) sub-divisions
            if enum == profile and n <= slices and (n == slices or n <= 2 or slices >= 7 and n <= 4):
                return n, enum
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, device, profile, engProfile, version=2):
        with self._state() as state:
            gpu, _, gi = self._gi(state, device)
            if engProfile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
                _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
            slices, ci_id = self._ci_profile(gpu, gi, profile)
            gi_profile = self._model_profile_by_id(gpu, gi["profile_id"])
            info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t() if version == 2 else pynvml.c_nvmlComputeInstanceProfileInfo_t()
            info.id = ci_id
            info.sliceCount = slices
            info.instanceCount = gi_profile.compute_slices // slices
            info.multiprocessorCount = (gi_profile.sm_count or 0) * slices // gi_profile.compute_slices
            if version == 2:
                info.name = f"{slices}c.{gi_profile.name}".encode()
            return info

    nvmlGpuInstanceGetComputeInstanceProfileInfoV = nvmlGpuInstanceGetComputeInstanceProfileInfo

    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance, profileId):
        self._take_time()
        with self._state(write=True) as state:
            gpu, record, gi = self._gi(state, gpuInstance)
            slices, _ = self._ci_profile(gpu, gi, profileId)
            gi_slices = self._model_profile_by_id(gpu, gi["profile_id"]).compute_slices
            used = sum(c["slices"] for c in gi["cis"].values())
            if used + slices > gi_slices:
                _raise(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
            ci_id = next(i for i in range(0, 8) if str(i) not in gi["cis"])
            gi["cis"][str(ci_id)] = {
                "id": ci_id,
                "profile_id": profileId,
                "slices": slices,
                "start": used,
                "uuid": "MIG-" + str(uuid.uuid4()),
                "processes": [],
            }
            return self._handle(pynvml.c_nvmlComputeInstance_t, _KIND_CI, gpu, gi["serial"], ci_id)

    def nvmlGpuInstanceGetComputeInstances(self, gpuInstance, profileId, computeInstancesRef, countRef):
        with self._state() as state:
            gpu, _, gi = self._gi(state, gpuInstance)
            found = sorted((c for c in gi["cis"].values() if c["profile_id"] == profileId), key=lambda c: c["id"])
            count = ctypes.cast(countRef, ctypes.POINTER(ctypes.c_uint)).contents
            for i, ci in enumerate(found):
                computeInstancesRef[i] = self._handle(pynvml.c_nvmlComputeInstance_t, _KIND_CI, gpu, gi["serial"], ci["id"])
            count.value = len(found)
            return pynvml.NVML_SUCCESS

    def nvmlComputeInstanceGetInfo(self, computeInstance):
        with self._state() as state:
            gpu, _, gi, ci = self._ci(state, computeInstance)
            info = pynvml.c_nvmlComputeInstanceInfo_t()
            info.device = self._handle(pynvml.c_nvmlDevice_t, _KIND_GPU, gpu)
            info.gpuInstance = self._handle(pynvml.c_nvmlGpuInstance_t, _KIND_GI, gpu, gi["serial"])
            info.id = ci["id"]
            info.profileId = ci["profile_id"]
            info.placement.start = ci["start"]
            info.placement.size = ci["slices"]
            return info

    def nvmlComputeInstanceDestroy(self, computeInstance):
        self._take_time()
        with self._state(write=True) as state:
            _, _, gi, ci = self._ci(state, computeInstance)
            if ci["processes"]:
                _raise(pynvml.NVML_ERROR_IN_USE)
            del gi["cis"][str(ci["id"])]
            return pynvml.NVML_SUCCESS

    # ------------------------------------------------------------------ MIG devices and processes

    def _mig_devices(self, record: dict) -> list[tuple[dict, dict]]:
        return [
            (gi, ci)
            for gi in sorted(record["gis"].values(), key=lambda g: g["id"])
            for ci in sorted(gi["cis"].values(), key=lambda c: c["id"])
        ]

    def nvmlDeviceGetMaxMigDeviceCount(self, device):
        with self._state() as state:
            gpu, record, _, _ = self._device(state, device)
            return self._models[gpu].compute_slices if record["mig_mode"] == pynvml.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        with self._state() as state:
            gpu, record, _, _ = self._device(state, device)
            devices = self._mig_devices(record)
            if not 0 <= index < self._models[gpu].compute_slices:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if index >= len(devices):
                _raise(pynvml.NVML_ERROR_NOT_FOUND)
            gi, ci = devices[index]
            return self._handle(pynvml.c_nvmlDevice_t, _KIND_MIG, gpu, gi["serial"], ci["id"])

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice):
        with self._state() as state:
            gpu, _, gi, _ = self._device(state, migDevice, mig_ok=True)
            if gi is None:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return self._handle(pynvml.c_nvmlDevice_t, _KIND_GPU, gpu)

    def nvmlDeviceGetGpuInstanceId(self, device):
        with self._state() as state:
            _, _, gi, _ = self._device(state, device, mig_ok=True)
            if gi is None:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return gi["id"]

    def nvmlDeviceGetComputeInstanceId(self, device):
        with self._state() as state:
            _, _, _, ci = self._device(state, device, mig_ok=True)
            if ci is None:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return ci["id"]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        with self._state() as state:
            _, record, gi, ci = self._device(state, handle, mig_ok=True)
            pairs = self._mig_devices(record) if ci is None else [(gi, ci)]
            return [
                pynvml.nvmlFriendlyObject(
                    {
                        "pid": p["pid"],
                        "usedGpuMemory": p["used_memory_mib"] * _MIB,
                        "gpuInstanceId": g["id"],
                        "computeInstanceId": c["id"],
                    }
                )
                for g, c in pairs
                for p in c["processes"]
            ]

    # ------------------------------------------------------------------ test hooks (not in pynvml)

    def _find_mig(self, state: dict, mig_uuid: str) -> dict:
        for node_gpu, record in state["gpus"].items():
            for gi in record["gis"].values():
                for ci in gi["cis"].values():
                    if ci["uuid"] == mig_uuid:
                        return ci
        raise LookupError(f"no simulated MIG device {mig_uuid!r}")

    def attach_process(self, mig_uuid: str, pid: int, used_memory_mib: int = 512) -> None:
        """Pretend process `pid` runs on the MIG device `mig_uuid` (any node of the fleet)."""
        with self._state(write=True) as state:
            self._find_mig(state, mig_uuid)["processes"].append({"pid": pid, "used_memory_mib": used_memory_mib})

    def detach_process(self, mig_uuid: str, pid: int) -> None:
        """Forget process `pid` on the MIG device `mig_uuid`."""
        with self._state(write=True) as state:
            ci = self._find_mig(state, mig_uuid)
            ci["processes"] = [p for p in ci["processes"] if p["pid"] != pid]

    def stage_mig_mode(self, index: int, mode: int) -> None:
        """Leave MIG mode `mode` (0 or 1) pending on GPU `index` of this node, the current mode kept,
        as ``nvidia-smi -i INDEX -mig MODE`` does on an A100/A30 until the GPU is reset; staging the
        current mode undoes a pending change. Refused as the driver refuses it: a mode other than 0
        or 1 (``NVMLError_InvalidArgument``), and MIG off while GPU instances exist
        (``NVMLError_InUse``)."""
        with self._state(write=True) as state:
            record = self._gpu(state, index)
            if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if mode == pynvml.NVML_DEVICE_MIG_DISABLE and record["gis"]:
                _raise(pynvml.NVML_ERROR_IN_USE)
            record["pending_mig_mode"] = mode

    def reset(self) -> None:
        """Forget all instances and processes: the fleet as it was when new."""
        with self._state(write=True) as state:
            state.clear()
            state.update(self._fresh_state())


#: The pynvml functions `SimulatedNvml` provides (the test of signatures walks this list).
API = sorted(
    name
    for name, value in vars(SimulatedNvml).items()
    if name.startswith("nvml") and callable(value)
)

for _name in _EXPORTED:  # constants, structures and errors as attributes, like the pynvml module
    setattr(SimulatedNvml, _name, getattr(pynvml, _name))
SimulatedNvml.NVMLError = pynvml.NVMLError


def check_signatures() -> list[str]:
    """Names whose signature differs from pynvml's (empty when the simulated NVML keeps the contract)."""
    differ = []
    for name in API:
        real = getattr(pynvml, name, None)
        if real is None:
            differ.append(f"{name}: not in pynvml")
            continue
        mine = list(inspect.signature(getattr(SimulatedNvml, name)).parameters)[1:]
        theirs = list(inspect.signature(inspect.unwrap(real)).parameters)
        if mine != theirs:
            differ.append(f"{name}: {mine} != pynvml {theirs}")
    return differ


def __getattr__(name: str) -> Any:
    """Module-level pynvml functions, bound to a library built from `prefect_mig.settings`.

    So ``import prefect_mig.gpu.simulated_nvml as pynvml`` works as a drop-in.
    """
    if name in API:
        return getattr(_default(), name)
    raise AttributeError(name)


_DEFAULT: SimulatedNvml | None = None


def _default() -> SimulatedNvml:
    global _DEFAULT
    if _DEFAULT is None:
        from prefect_mig.settings import load_settings

        settings = load_settings()
        fleet = settings.fleet()
        node = settings.node if settings.node in fleet.node_names else None
        _DEFAULT = SimulatedNvml(fleet, node=node, state_dir=settings.state_dir)
    return _DEFAULT
