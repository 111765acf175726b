"""A C-level NVML stub under the real pynvml, so CI runs the backend's ctypes marshalling.

`build_stub` compiles ``nvml_stub.c`` (beside this file) with gcc into a ``libnvidia-ml.so.1``
with nvml.h's exact prototypes. `NvmlStub` writes the hardware of one fleet node (from the MIG
catalog: the same placement tables as `prefect_mig.gpu.simulated_nvml.SimulatedNvml`) to a text
file, loads its own copy of the library, and loads a private copy of nvidia-ml-py's ``pynvml``
bound to it: ``stub.pynvml`` is the real pynvml module code, talking to C. The process's own
``pynvml`` module is left alone (so `prefect_mig.gpu.nvml_available` still says "no driver").

Fault hooks (C functions named ``stub*``): processes on a MIG device, a non-process holder of a
GPU instance (DCGM), a non-root caller, PIDs hidden by a PID namespace, a profile whose reported
``instanceCount`` is wrong, a driver older than pynvml, and "fail the next call of F with code C".

Examples:
    ```python
    import tempfile
    from prefect_mig.gpu import GpuBackend
    from prefect_mig.testing.nvml_stub import NvmlStub, build_stub

    work = tempfile.mkdtemp()
    stub = NvmlStub("node-a=1xA30-24GB", library=build_stub(work), work_dir=work)
    with GpuBackend(stub.pynvml) as gpus:
        assert gpus.gpu(0).device_name == "NVIDIA A30"
    ```
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import itertools
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pynvml

from prefect_mig.gpu.simulated_nvml import profile_engine_counts
from prefect_mig.model import FleetSpec, Layout, get_model

SOURCE = Path(__file__).with_name("nvml_stub.c")
_SERIAL = itertools.count()


def build_stub(out_dir: str | Path, *, old_driver: bool = False) -> Path:
    """Compile the stub with gcc into `out_dir` (reused while the source is unchanged).

    Args:
        old_driver: leave out ``nvmlDeviceGetComputeRunningProcesses_v3``, like a driver older than
            the installed nvidia-ml-py.

    Raises:
        RuntimeError: gcc is missing or the build failed (the message says how to install it).
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is not installed: the NVML stub is built from C. Install it (`apt-get install gcc`).")
    digest = hashlib.sha1(SOURCE.read_bytes() + bytes([old_driver])).hexdigest()[:12]
    target = Path(out_dir) / f"nvml-stub-{digest}" / "libnvidia-ml.so.1"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = ["-DSTUB_OLD_DRIVER"] if old_driver else []
        tmp = target.with_suffix(".tmp")
        built = subprocess.run(
            [gcc, "-std=c11", "-D_GNU_SOURCE", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
             *flags, "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if built.returncode:
            raise RuntimeError(f"building the NVML stub failed:\n{built.stderr}")
        tmp.replace(target)
    return target


class NvmlStub:
    """One fleet node's GPUs behind the C stub, and a private pynvml bound to it.

    Args:
        fleet: a fleet spec string or `FleetSpec`; `node` picks the node (default: the first).
        library: a stub built by `build_stub`; each `NvmlStub` loads its own copy (its own state).
        work_dir: where the hardware file and the library copy go.
        reported_instance_count: ``{profile name: count}`` that ``instanceCount`` reports instead
            of the real limit (NVML misreports it on A30).
        driver_version: what ``nvmlSystemGetDriverVersion`` says.
        layouts: ``{gpu index: "3g.40gb@0 + 1g.10gb@4"}``, instances present from the start.
        mig_modes: ``{gpu index: (current, pending)}`` (default: MIG on, ``(1, 1)``).
        device_names: ``{gpu index: "NVIDIA H800"}``: another name for the model's geometry (a
            renamed variant, or a GPU the catalog does not list).
        pci_device_ids: ``{gpu index: 0x232910DE}`` (default: the model's first listed id, or 0).
        without_mig: GPU indices that have no MIG at all (an L4 beside the A30s): no profile, and
            NVML answers NotSupported for their MIG mode.
    """

    def __init__(
        self,
        fleet: FleetSpec | str,
        *,
        library: Path,
        work_dir: str | Path,
        node: str | None = None,
        reported_instance_count: dict[str, int] | None = None,
        driver_version: str = "570.133.20",
        layouts: dict[int, str] | None = None,
        mig_modes: dict[int, tuple[int, int]] | None = None,
        device_names: dict[int, str] | None = None,
        pci_device_ids: dict[int, int] | None = None,
        without_mig: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.fleet = fleet if isinstance(fleet, FleetSpec) else FleetSpec.parse(fleet)
        self.node = node or self.fleet.node_names[0]
        self.dir = Path(work_dir) / f"nvml-stub-{next(_SERIAL)}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        config = self.dir / "hardware.txt"
        config.write_text(self._hardware(
            reported_instance_count or {}, driver_version, layouts or {}, mig_modes or {},
            device_names or {}, pci_device_ids or {}, set(without_mig),
        ))
        self.config = config
        copy = self.dir / "libnvidia-ml.so.1"
        shutil.copyfile(library, copy)
        self.lib = ctypes.CDLL(str(copy))
        self.lib.stubConfigure(str(config).encode())
        self.pynvml = self._private_pynvml()

    def _hardware(
        self, reported: dict, driver_version: str, layouts: dict, modes: dict, names: dict, pci_ids: dict,
        without_mig: set[int],
    ) -> str:
        lines = [f"driver {driver_version}"]
        for index, name in enumerate(self.fleet.gpu_models(self.node)):
            model = get_model(name)
            gpu_uuid = "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"prefect-mig-stub:{self.fleet}:{self.node}/{index}"))
            current, pending = modes.get(index, (1, 1))
            lines.append(
                f"gpu {gpu_uuid} {current} {pending} {model.total_memory_mib} {model.compute_slices} "
                f"{pci_ids.get(index, (*model.pci_device_ids, 0)[0]):x} {names.get(index, model.device_name)}"
            )
            for p in () if index in without_mig else model.profiles:
                starts = " ".join(map(str, p.placement_starts))
                engines = " ".join(map(str, profile_engine_counts(model, p.name)))
                lines.append(
                    f"profile {p.nvml_profile} {p.id} {p.compute_slices} {p.max_instances} "
                    f"{reported.get(p.name, p.max_instances)} {p.sm_count or 0} {int(p.media_engines)} {engines} "
                    f"{p.memory_mib} {p.placement_size} {len(p.placement_starts)} {starts} {p.name}"
                )
            if index in layouts:
                for placement in Layout.parse(model.name, layouts[index]).instances:
                    lines.append(f"instance {model.profile(placement.profile).id} {placement.start}")
        return "\n".join(lines) + "\n"

    def env(self, *, non_root: bool = False, hide_pids: bool = False) -> dict[str, str]:
        """Environment for a subprocess whose plain ``pynvml`` loads this stub (its own state,
        starting from the hardware file), e.g. to run the ``prefect-mig`` CLI on it."""
        return {
            "LD_LIBRARY_PATH": str(self.dir),
            "NVML_STUB_CONFIG": str(self.config),
            "NVML_STUB_NONROOT": str(int(non_root)),
            "NVML_STUB_HIDE_PIDS": str(int(hide_pids)),
            "PREFECT_MIG_BACKEND": "nvml",
        }

    def _private_pynvml(self) -> ModuleType:
        name = "_pynvml_on_" + self.dir.name.replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, pynvml.__file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pynvml looks itself up there while it builds its error classes
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[name]
        module.nvmlLib = self.lib  # pynvml's loader skips CDLL("libnvidia-ml.so.1") once this is set
        module.nvml_stub = self
        return module

    # ------------------------------------------------------------------ fault hooks

    def attach_process(self, mig_uuid: str, pid: int, used_memory_mib: int = 512) -> None:
        """Pretend process `pid` runs on MIG device `mig_uuid`."""
        rc = self.lib.stubAttachProcess(mig_uuid.encode(), ctypes.c_uint(pid), ctypes.c_ulonglong(used_memory_mib << 20))
        if rc:
            raise LookupError(f"no MIG device {mig_uuid!r} in the stub (or 8 processes on it already)")

    def detach_process(self, mig_uuid: str, pid: int) -> None:
        self.lib.stubDetachProcess(mig_uuid.encode(), ctypes.c_uint(pid))

    def hold(self, gpu: int, gpu_instance_id: int, on: bool = True) -> None:
        """A non-process NVML client (DCGM, dcgm-exporter) holds the GPU instance: destroying it or
        its compute instances is ``IN_USE`` while no process is listed."""
        if self.lib.stubHoldGpuInstance(ctypes.c_uint(gpu), ctypes.c_uint(gpu_instance_id), int(on)):
            raise LookupError(f"no GPU instance {gpu_instance_id} on GPU {gpu} in the stub")

    def non_root(self, on: bool = True) -> None:
        """Privileged calls (placements, instance listing, create/destroy) return ``NO_PERMISSION``."""
        self.lib.stubSetNonRoot(int(on))

    def hide_pids(self, on: bool = True) -> None:
        """Process listings come back empty, as for a caller outside the host PID namespace."""
        self.lib.stubHidePids(int(on))

    def mutations(self) -> int:
        """How many calls that change the GPU (create, destroy, set MIG mode) reached the stub."""
        return self.lib.stubMutations()

    def fail_next(self, function: str, code: int, times: int = 1) -> None:
        """The next `times` calls of C function `function` return NVML error `code`."""
        self.lib.stubFailNext(function.encode(), int(code), int(times))
