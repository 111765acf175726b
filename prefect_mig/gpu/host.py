"""What the host around NVML must provide, read from ``/proc`` and ``/etc``: the PID namespace, the
MIG capability files, other NVML clients, CDI specs. Read-only; `prefect-mig doctor` reports them and
the agent refuses to start where busy slices would look idle.

Examples:
    ```python
    from prefect_mig.gpu.host import pid_namespace

    is_host, detail = pid_namespace()
    assert is_host in (True, False, None) and detail
    ```
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect_mig.errors import NotInHostPidNamespace
from prefect_mig.gpu.backend import GpuBackend
from prefect_mig.gpu.simulated_nvml import SimulatedNvml

#: The kernel's initial PID namespace has this inode (PROC_PID_INIT_INO) on every Linux since 3.8.
HOST_PID_NAMESPACE_INODE = 0xEFFFFFFC
#: NVML clients that hold GPU handles without showing up as compute processes (DCGM #95, #276).
NVML_CLIENTS = ("nv-hostengine", "dcgm-exporter", "nvsm", "dcgmi")
MIG_CAPABILITIES = ("config", "monitor")
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


def pid_namespace(proc: Path = Path("/proc")) -> tuple[bool | None, str]:
    """(whether this process is in the host's PID namespace, how we know); None when unknown.

    Comparing ``/proc/self/ns/pid`` with ``/proc/1/ns/pid`` does not tell: inside a container PID 1
    is the container's init, in the same namespace. The initial namespace's fixed inode does.
    """
    try:
        link = os.readlink(proc / "self" / "ns" / "pid")  # "pid:[4026531836]"
        inode = int(link.split("[", 1)[1].rstrip("]"))
    except (OSError, IndexError, ValueError) as exc:
        return None, f"cannot read {proc}/self/ns/pid ({exc})"
    if inode == HOST_PID_NAMESPACE_INODE:
        return True, f"{link} is the host's PID namespace"
    return False, f"{link} is not the host's PID namespace (pid:[{HOST_PID_NAMESPACE_INODE}])"


def require_host_pid_namespace(backend: GpuBackend, proc: Path = Path("/proc")) -> None:
    """Refuse to drive real GPUs from a PID namespace other than the host's.

    NVML lists no process outside the caller's PID namespace, so from a container started without
    ``--pid=host`` every slice looks idle and a re-carve could destroy one under a running task.
    The simulated NVML has no such blind spot and is let through.

    Raises:
        NotInHostPidNamespace: with what to change.
    """
    if isinstance(backend.nvml, SimulatedNvml):
        return
    is_host, detail = pid_namespace(proc)
    if is_host is False:
        raise NotInHostPidNamespace(
            f"refusing to manage real GPUs from this PID namespace ({detail}): NVML hides the processes "
            "of other namespaces, so busy MIG slices would look idle and could be destroyed under a "
            "running task. Run the agent on the host, or its container with --pid=host "
            "(Kubernetes: hostPID: true).",
            detail=detail,
        )


def mig_capabilities(proc: Path = Path("/proc")) -> dict[str, str]:
    """``{"config": state, "monitor": state}`` for the MIG capability files: ``readable``,
    ``not readable`` or ``missing`` (needed to change MIG instances and to see them as non-root)."""
    found = {}
    for name in MIG_CAPABILITIES:
        path = proc / "driver" / "nvidia" / "capabilities" / "mig" / name
        if not path.exists():
            found[name] = "missing"
        else:
            found[name] = "readable" if os.access(path, os.R_OK) else "not readable"
    return found


def nvml_clients(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, name) of running DCGM / dcgm-exporter / nvsm processes visible from here."""
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if any(comm.startswith(name[:15]) for name in NVML_CLIENTS):  # comm is cut at 15 characters
            found.append((int(entry.name), comm))
    return sorted(found)


def cdi_devices(dirs: tuple[str, ...] = CDI_DIRS) -> dict[str, list[str]]:
    """CDI device names (``nvidia.com/gpu=0``, ``nvidia.com/gpu=0:1`` for a MIG device) per spec file."""
    import yaml

    found: dict[str, list[str]] = {}
    for directory in dirs:
        for path in sorted(Path(directory).glob("*")) if Path(directory).is_dir() else ():
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            try:
                spec = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                found[str(path)] = [f"unreadable: {exc}"]
                continue
            kind = spec.get("kind", "?")
            found[str(path)] = [f"{kind}={d.get('name')}" for d in spec.get("devices", []) if isinstance(d, dict)]
    return found
