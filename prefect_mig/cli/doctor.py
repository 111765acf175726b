"""``prefect-mig doctor``: read-only checks to run first on a real GPU host, each with its fix.

It changes nothing: no MIG mode switch, no instance created or destroyed, no container started.
It reads NVML (driver version, MIG mode current/pending, the catalog vs what NVML reports for each
GPU, with MIG mode off too: so the catalog is checked before MIG is enabled), ``/proc``
(permissions, the PID namespace, DCGM and other NVML clients), the CDI spec directories and
``docker info`` (runtimes, the NVIDIA hook), and the configured Redis's ``INFO``
(``PREFECT_MIG_REDIS_URL``, or the local cluster's if it runs). Exit status 1 when a check fails.

Examples:
    ```python
    import tempfile
    from prefect_mig.cli.doctor import nvml_checks
    from prefect_mig.gpu import GpuBackend, SimulatedNvml

    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tempfile.mkdtemp())) as gpus:
        checks = nvml_checks(gpus)
    assert {c.status for c in checks} == {"pass"}
    ```
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from prefect_mig.cli.output import console, print_json
from prefect_mig.errors import MigDisabled, NoPermission, PrefectMigError
from prefect_mig.gpu import GpuBackend
from prefect_mig.gpu.host import CDI_DIRS, cdi_devices, mig_capabilities, nvml_clients, pid_namespace
from prefect_mig.model import GpuModel, catalog

#: First driver branch with explicit MIG placements (nvmlDeviceCreateGpuInstanceWithPlacement).
MIN_DRIVER = 460
#: First branch that places 4g and 3g on one GPU together.
FULL_LAYOUT_DRIVER = 510


class Check(BaseModel):
    """One check's outcome: what was looked at, what was found, and what to do about it."""

    name: str
    status: Literal["pass", "warn", "fail"]
    detail: str
    fix: str | None = None


def nvml_checks(backend: GpuBackend) -> list[Check]:
    """Driver version, and per GPU: MIG mode, the catalog vs NVML's profiles and placements."""
    checks = [_driver_check(backend.driver_version())]
    for gpu in backend.gpus():
        name = f"GPU {gpu.index} ({gpu.device_name})"
        if not gpu.mig_supported:  # `nvidia-smi -mig 1` would fail: nothing to fix on this host
            checks.append(Check(name=f"{name}: MIG mode", status="warn",
                                detail="this GPU has no MIG: prefect-mig serves nothing on it"))
            continue
        if not gpu.mig_enabled:
            checks.append(
                Check(
                    name=f"{name}: MIG mode",
                    status="fail" if not gpu.mig_pending else "warn",
                    detail=f"current off, pending {'on' if gpu.mig_pending else 'off'}",
                    fix=(f"sudo nvidia-smi -i {gpu.index} -mig 1" if not gpu.mig_pending else "")
                    + f"; then A100/A30 need a GPU reset (sudo nvidia-smi -i {gpu.index} -r) or a reboot",
                )
            )
            offered = _model_check(backend, gpu.index, name, gpu.gpu_model, mig_on=False)
            checks += [offered] if offered else []
            continue
        checks.append(
            Check(
                name=f"{name}: MIG mode",
                status="pass" if gpu.mig_pending else "warn",
                detail=f"current on, pending {'on' if gpu.mig_pending else 'off'}",
                fix=None if gpu.mig_pending else "MIG goes off at the next GPU reset; undo with "
                f"sudo nvidia-smi -i {gpu.index} -mig 1",
            )
        )
        checks.append(_model_check(backend, gpu.index, name, gpu.gpu_model))
    return checks


def _driver_check(version: str) -> Check:
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return Check(name="driver version", status="warn", detail=f"unparsable version {version!r}")
    if major < MIN_DRIVER:
        status, fix = "fail", f"upgrade the NVIDIA driver to R{MIN_DRIVER} or newer (explicit MIG placements)"
    elif major < FULL_LAYOUT_DRIVER:
        status, fix = "warn", f"R{FULL_LAYOUT_DRIVER}+ is needed to place 4g and 3g on one GPU together"
    else:
        status, fix = "pass", None
    return Check(name="driver version", status=status, detail=version, fix=fix)


def _model_check(
    backend: GpuBackend, index: int, name: str, catalog_name: str | None, *, mig_on: bool = True
) -> Check | None:
    """The catalog vs the profiles and placements NVML reports (None: the GPU has no MIG at all).

    The driver answers these reads with MIG mode off too, so the catalog is checked before MIG is
    enabled; GPU instances without compute instance are looked for only with MIG on."""
    check = f"{name}: profiles and placements"
    off = "" if mig_on else " (read with MIG mode off)"
    try:
        nvml = backend.gpu_model(index) if mig_on else backend.offered_model(index)
        half_made = [str(m) for m in backend.instances(index) if m.mig_uuid is None] if mig_on else []
    except PrefectMigError as exc:
        if isinstance(exc, MigDisabled) and not mig_on:
            return None  # no MIG at all: the MIG mode check says so
        if mig_on or isinstance(exc, NoPermission):
            return Check(name=check, status="fail", detail=str(exc), fix="run as root (or grant the MIG capabilities)")
        return Check(
            name=check, status="warn", detail=f"with MIG mode off: {exc}",
            fix="run `prefect-mig doctor` again once MIG mode is on (some drivers answer only then)",
        )
    known = catalog().get(catalog_name) if catalog_name else None
    if known is None:
        return Check(
            name=check,
            status="warn",
            detail=f"not in the catalog{off}: using the model NVML reports, named {nvml.name} "
            f"({len(nvml.profiles)} profiles)",
            fix="nothing to do; please report the GPU (`prefect-mig gpus --json`) so the catalog can list it",
        )
    differences = _differences(known, nvml)
    if half_made:
        differences.append(f"GPU instance(s) without compute instance: {', '.join(half_made)}")
    if not differences:
        return Check(name=check, status="pass", detail=f"{known.name}: NVML agrees with the catalog{off}")
    return Check(
        name=check,
        status="warn",
        detail=f"{known.name}{off}: " + "; ".join(differences),
        fix="the backend follows NVML; a GPU instance without compute instance is repaired by the next layout",
    )


def _differences(known: GpuModel, nvml: GpuModel) -> list[str]:
    found = []
    theirs = {p.id: p for p in nvml.profiles}
    for p in known.profiles:
        q = theirs.pop(p.id, None)
        if q is None:
            found.append(f"{p.name} (id {p.id}) not offered by the driver")
            continue
        if (q.name, q.placement_starts, q.placement_size) != (p.name, p.placement_starts, p.placement_size):
            found.append(
                f"id {p.id}: catalog {p.name} at {list(p.placement_starts)}:{p.placement_size}, "
                f"NVML {q.name} at {list(q.placement_starts)}:{q.placement_size}"
            )
        elif q.memory_mib != p.memory_mib:
            found.append(f"{p.name}: {q.memory_mib} MiB (catalog {p.memory_mib})")
    found.extend(f"{q.name} (id {q.id}) offered but not in the catalog" for q in theirs.values())
    return found


def host_checks(proc: Path = Path("/proc"), cdi_dirs: tuple[str, ...] = CDI_DIRS) -> list[Check]:
    """Permissions, the PID namespace, other NVML clients and CDI specs, from this host's files."""
    checks = []
    caps = mig_capabilities(proc)
    root = os.geteuid() == 0
    caps_text = ", ".join(f"mig/{k} {v}" for k, v in caps.items())
    if "missing" in caps.values():
        checks.append(
            Check(
                name="permissions",
                status="fail",
                detail=f"uid {os.geteuid()}; {caps_text}",
                fix="no MIG capability files: install the NVIDIA driver (R450+) and load its kernel module",
            )
        )
    else:
        checks.append(
            Check(
                name="permissions",
                status="pass" if root else "warn",
                detail=f"uid {os.geteuid()}; {caps_text}",
                fix=None if root else "run the agent as root: listing and changing MIG instances needs it "
                "(or access to the /dev/nvidia-caps devices named in those files)",
            )
        )
    is_host, detail = pid_namespace(proc)
    checks.append(
        Check(
            name="PID namespace",
            status={True: "pass", False: "fail", None: "warn"}[is_host],
            detail=detail,
            fix=None if is_host else "run the agent on the host or with --pid=host (Kubernetes: hostPID: true): "
            "NVML hides other namespaces' processes, so busy slices look idle",
        )
    )
    clients = nvml_clients(proc)
    checks.append(
        Check(
            name="other NVML clients",
            status="warn" if clients else "pass",
            detail=", ".join(f"{name} (pid {pid})" for pid, name in clients) or "no DCGM, dcgm-exporter or nvsm running",
            fix="they hold GPU handles, so destroying MIG instances fails (in use); stop them while "
            "re-carving, as nvidia-mig-parted does" if clients else None,
        )
    )
    specs = cdi_devices(cdi_dirs)
    names = [n for devices in specs.values() for n in devices if n.startswith("nvidia.com/")]
    checks.append(
        Check(
            name="CDI devices",
            status="pass" if names else "warn",
            detail=f"{len(names)} NVIDIA device name(s) in {', '.join(specs) or ' and '.join(cdi_dirs) + ': no spec'}"
            + (f": {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else ""),
            fix=None if names else "optional (Docker binds by DeviceRequest): sudo nvidia-ctk cdi generate "
            "--output=/etc/cdi/nvidia.yaml, again after each re-carve (MIG device names change)",
        )
    )
    return checks


def docker_checks(info: dict[str, Any] | None, error: str | None = None) -> list[Check]:
    """Runtimes and the NVIDIA hook, from ``docker info`` (`info`; None with `error` if no engine)."""
    if info is None:
        return [
            Check(
                name="Docker engine",
                status="fail",
                detail=error or "no answer",
                fix="start dockerd, or point PREFECT_MIG_DOCKER_HOST at the engine that runs task containers",
            )
        ]
    runtimes = sorted(info.get("Runtimes") or {})
    hook = shutil.which("nvidia-container-runtime-hook")
    detail = f"runtimes {', '.join(runtimes) or 'none'}, default {info.get('DefaultRuntime', '?')}; "
    detail += f"NVIDIA hook {hook or 'not found'}"
    if info.get("CDISpecDirs"):
        detail += f"; CDI spec dirs {', '.join(info['CDISpecDirs'])}"
    ok = bool(hook) or "nvidia" in runtimes
    return [
        Check(
            name="Docker GPU support",
            status="pass" if ok else "fail",
            detail=detail,
            fix=None if ok else "install nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure "
            "--runtime=docker && sudo systemctl restart docker`",
        )
    ]


def redis_checks(client) -> list[Check]:
    """Whether the scripts can see this Redis restart: its ``INFO server`` must give a ``run_id``.

    After a restart that lost the last writes (no persistence, a restore, a failover), a grant may be
    gone while its holder still runs; the scripts hold every unleased slice of a fencing node until
    its agent has looked, but only when they see the server's ``run_id`` change.

    Examples:
        ```python
        from prefect_mig.cli.doctor import redis_checks
        from prefect_mig.testing.redis_server import RedisServer

        with RedisServer() as server:
            (check,) = redis_checks(server.client())
        assert check.status == "pass"
        ```
    """
    import redis

    name = "Redis restart detection"
    try:
        info = client.info("server")
    except redis.exceptions.NoPermissionError as exc:
        return [Check(name=name, status="fail", detail=f"INFO refused: {exc}",
                      fix="grant INFO to prefect-mig's Redis user: ACL SETUSER <user> +info")]
    except redis.exceptions.RedisError as exc:
        return [Check(name=name, status="fail", detail=f"no answer: {exc}",
                      fix="start the Redis PREFECT_MIG_REDIS_URL names, or fix the URL")]
    return [restart_detection(info)]


def restart_detection(info: dict[str, Any]) -> Check:
    """The restart-detection check from a parsed ``INFO server``."""
    name = "Redis restart detection"
    run_id = str(info.get("run_id") or "")
    if not run_id:
        return Check(
            name=name, status="fail",
            detail="INFO server gives no run_id (a proxy or managed service hides it): a Redis restart that lost "
            "a grant would go unseen, and that slice could be granted to a second holder while its first still runs",
            fix="point PREFECT_MIG_REDIS_URL at a Redis (or a proxy) whose INFO server reports run_id",
        )
    return Check(name=name, status="pass", detail=f"redis {info.get('redis_version', '?')}, run_id {run_id[:12]}")


def run_doctor(backend: GpuBackend | None = None, *, docker_host: str | None = None, redis_client=None) -> list[Check]:
    """Every check, on `backend` (default: the real NVML), this host's Docker engine and
    `redis_client` (none: no Redis check)."""
    checks: list[Check] = []
    try:
        with backend or GpuBackend() as gpus:
            checks += nvml_checks(gpus)
    except PrefectMigError as exc:
        checks.append(
            Check(
                name="NVML",
                status="fail",
                detail=str(exc),
                fix="install the NVIDIA driver (R460+); without a GPU use PREFECT_MIG_BACKEND=simulated",
            )
        )
    checks += host_checks()
    from prefect_mig.launchers.images import docker_client

    try:
        client = docker_client(docker_host)
    except PrefectMigError as exc:
        checks += docker_checks(None, str(exc))
    else:
        try:
            checks += docker_checks(client.info())
        finally:
            client.close()
    if redis_client is not None:
        checks += redis_checks(redis_client)
    return checks


def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Check this host for prefect-mig on real GPUs (read-only): driver, MIG mode, permissions,
    PID namespace, Docker and CDI, the catalog vs NVML, other NVML clients, and whether the configured
    Redis shows its restarts. Each failure says its fix."""
    from prefect_mig.allocator.connection import client_for_url, url_options
    from prefect_mig.allocator.embedded import running_embedded_url
    from prefect_mig.settings import load_settings

    settings = load_settings()
    url = settings.redis_url or running_embedded_url(settings.state_dir)  # starts nothing
    redis_client = None
    if url is not None:
        options = url_options(settings, url) if settings.redis_url else {}
        redis_client = client_for_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, **options)
    try:
        checks = run_doctor(docker_host=settings.docker_host, redis_client=redis_client)
    finally:
        if redis_client is not None:
            redis_client.close()
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        print_json({"ok": not failed, "checks": [c.model_dump() for c in checks]})
    else:
        style = {"pass": "[green]pass[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        for c in checks:
            console.print(f"{style[c.status]}  [bold]{c.name}[/bold]: {c.detail}", highlight=False)
            if c.fix and c.status != "pass":
                console.print(f"      fix: {c.fix}", highlight=False)
        console.print(f"{len(failed)} check(s) failed" if failed else "no check failed", highlight=False)
    if failed:
        raise typer.Exit(1)
