"""``prefect-mig doctor`` on the C NVML stub (through the real pynvml) and on prepared host trees:
each problem a real host can have is reported with its fix, and nothing is changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_mig.cli.doctor import docker_checks, host_checks, nvml_checks
from prefect_mig.errors import NotInHostPidNamespace
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.gpu.host import HOST_PID_NAMESPACE_INODE, require_host_pid_namespace

FLEET = "node-a=1xH100-80GB+1xA30-24GB"


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_healthy_gpu_passes_and_a_gpu_with_mig_off_fails_with_the_command_that_fixes_it(make_nvml_stub):
    stub = make_nvml_stub(FLEET, layouts={0: "3g.40gb@0 + 1g.10gb@4"}, mig_modes={1: (0, 0)})
    with GpuBackend(stub.pynvml) as backend:
        before = [str(m) for m in backend.instances(0)]
        checks = _by_name(nvml_checks(backend))
        assert [str(m) for m in backend.instances(0)] == before
    assert stub.mutations() == 0, "doctor must change nothing"
    assert checks["driver version"].status == "pass"
    assert checks["GPU 0 (NVIDIA H100 80GB HBM3): MIG mode"].status == "pass"
    assert checks["GPU 0 (NVIDIA H100 80GB HBM3): profiles and placements"].status == "pass"
    off = checks["GPU 1 (NVIDIA A30): MIG mode"]
    assert off.status == "fail" and "sudo nvidia-smi -i 1 -mig 1" in off.fix and "reset" in off.fix
    assert checks["GPU 1 (NVIDIA A30): profiles and placements"].status == "pass"


def test_with_mig_mode_off_the_catalog_is_still_checked_against_nvml_before_mig_is_enabled(make_nvml_stub):
    """A real H100 80GB HBM3 (driver 580.159.04) answers the profile and placement reads with MIG
    off, so the operator learns whether the catalog agrees before switching MIG on."""
    stub = make_nvml_stub(
        "node-a=3xH100-80GB",
        mig_modes={0: (0, 0), 1: (0, 0), 2: (0, 0)},
        device_names={2: "NVIDIA RTX PRO 6000 Blackwell"},
        pci_device_ids={2: 0x2BB510DE},
    )
    hardware = stub.config.read_text().splitlines()  # GPU 1's driver gives 1g.20gb less memory
    second_gpu = [i for i, line in enumerate(hardware) if line.startswith("gpu ")][1]
    at = next(i for i in range(second_gpu, len(hardware)) if hardware[i].endswith(" 1g.20gb"))
    hardware[at] = hardware[at].replace(" 20096 ", " 19968 ")
    stub.config.write_text("\n".join(hardware) + "\n")
    with GpuBackend(stub.pynvml) as backend:
        checks = _by_name(nvml_checks(backend))
    assert stub.mutations() == 0, "doctor must change nothing"
    h100 = "GPU 0 (NVIDIA H100 80GB HBM3)"
    assert checks[f"{h100}: MIG mode"].status == "fail"
    agrees = checks[f"{h100}: profiles and placements"]
    assert (agrees.status, agrees.detail) == ("pass", "H100-80GB: NVML agrees with the catalog (read with MIG mode off)")
    differs = checks["GPU 1 (NVIDIA H100 80GB HBM3): profiles and placements"]
    assert differs.status == "warn" and "1g.20gb: 19968 MiB (catalog 20096)" in differs.detail
    unknown = checks["GPU 2 (NVIDIA RTX PRO 6000 Blackwell): profiles and placements"]
    assert unknown.status == "warn" and "not in the catalog (read with MIG mode off)" in unknown.detail


def test_a_gpu_without_mig_is_named_as_such_not_given_the_command_to_switch_mig_on(make_nvml_stub):
    """NVML answers NotSupported for the MIG mode of a GPU without MIG (an L4 beside an A30):
    `nvidia-smi -mig 1` fails there, so doctor says the GPU serves nothing instead of failing it."""
    stub = make_nvml_stub("node-a=2xA30-24GB", device_names={1: "NVIDIA L4"}, without_mig={1})
    with GpuBackend(stub.pynvml) as backend:
        checks = _by_name(nvml_checks(backend))
    assert stub.mutations() == 0, "doctor must change nothing"
    assert checks["GPU 0 (NVIDIA A30): MIG mode"].status == "pass"
    l4 = checks["GPU 1 (NVIDIA L4): MIG mode"]
    assert (l4.status, l4.fix) == ("warn", None)
    assert l4.detail == "this GPU has no MIG: prefect-mig serves nothing on it"
    assert "GPU 1 (NVIDIA L4): profiles and placements" not in checks


def test_a_pending_mig_mode_change_is_a_warning(make_nvml_stub):
    stub = make_nvml_stub("node-a=1xA30-24GB", mig_modes={0: (1, 0)})
    with GpuBackend(stub.pynvml) as backend:
        (mode,) = [c for c in nvml_checks(backend) if c.name.endswith("MIG mode")]
    assert mode.status == "warn" and "pending off" in mode.detail


@pytest.mark.parametrize(("version", "status", "says"), [("450.80.02", "fail", "R460"), ("470.256.02", "warn", "R510")])
def test_an_old_driver_is_reported_with_the_release_it_needs(make_nvml_stub, version, status, says):
    stub = make_nvml_stub("node-a=1xA30-24GB", driver_version=version)
    with GpuBackend(stub.pynvml) as backend:
        driver = _by_name(nvml_checks(backend))["driver version"]
    assert (driver.status, driver.detail) == (status, version) and says in driver.fix


def test_a_non_root_caller_is_told_to_run_as_root(make_nvml_stub):
    stub = make_nvml_stub("node-a=1xH100-80GB")
    stub.non_root()
    with GpuBackend(stub.pynvml) as backend:
        profiles = [c for c in nvml_checks(backend) if c.name.endswith("profiles and placements")]
    assert [c.status for c in profiles] == ["fail"]
    assert "root" in profiles[0].detail and "root" in profiles[0].fix


def test_a_gpu_outside_the_catalog_and_a_half_made_instance_are_warnings(make_nvml_stub):
    stub = make_nvml_stub(
        "node-a=2xH100-80GB",
        device_names={1: "NVIDIA RTX PRO 6000 Blackwell"},
        pci_device_ids={1: 0x2BB510DE},
        layouts={0: "1g.10gb@0"},
    )
    with GpuBackend(stub.pynvml) as backend:
        gi = backend.nvml.nvmlDeviceGetGpuInstanceById(backend.nvml.nvmlDeviceGetHandleByIndex(0), 1)
        for ci in backend._compute_instances(gi):
            backend.nvml.nvmlComputeInstanceDestroy(ci)
        checks = [c for c in nvml_checks(backend) if c.name.endswith("profiles and placements")]
    assert [c.status for c in checks] == ["warn", "warn"]
    assert "without compute instance: 1g.10gb@0" in checks[0].detail
    assert "not in the catalog" in checks[1].detail and "RTX-PRO-6000-Blackwell" in checks[1].detail


def _proc(tmp_path: Path, *, pid_inode: int, comms: dict[int, str] = {}, caps: bool = True) -> Path:  # noqa: B006
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    os.symlink(f"pid:[{pid_inode}]", proc / "self" / "ns" / "pid")
    for pid, comm in comms.items():
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "comm").write_text(comm + "\n")
    if caps:
        mig = proc / "driver" / "nvidia" / "capabilities" / "mig"
        mig.mkdir(parents=True)
        for name in ("config", "monitor"):
            (mig / name).write_text("DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n")
    return proc


def test_host_checks_report_a_container_pid_namespace_dcgm_and_missing_capabilities(tmp_path):
    proc = _proc(tmp_path, pid_inode=4026532252, comms={812: "nv-hostengine", 901: "dcgm-exporter", 7: "bash"}, caps=False)
    checks = _by_name(host_checks(proc, cdi_dirs=(str(tmp_path / "no-cdi"),)))
    assert checks["PID namespace"].status == "fail" and "--pid=host" in checks["PID namespace"].fix
    clients = checks["other NVML clients"]
    assert clients.status == "warn" and "nv-hostengine (pid 812)" in clients.detail and "dcgm-exporter" in clients.detail
    assert checks["permissions"].status == "fail" and "mig/config missing" in checks["permissions"].detail
    assert checks["CDI devices"].status == "warn" and "nvidia-ctk cdi generate" in checks["CDI devices"].fix


def test_host_checks_pass_on_a_well_set_up_host(tmp_path):
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n- name: '0:1'\n- name: all\n"
    )
    proc = _proc(tmp_path, pid_inode=HOST_PID_NAMESPACE_INODE, comms={1: "systemd"})
    checks = _by_name(host_checks(proc, cdi_dirs=(str(cdi),)))
    assert {n: c.status for n, c in checks.items() if n != "permissions"} == {
        "PID namespace": "pass",
        "other NVML clients": "pass",
        "CDI devices": "pass",
    }
    assert "nvidia.com/gpu=0:1" in checks["CDI devices"].detail
    assert checks["permissions"].status == ("pass" if os.geteuid() == 0 else "warn")


def test_docker_without_the_nvidia_hook_or_runtime_fails_with_the_toolkit_fix(docker_client):
    info = docker_client.info()  # this engine's real answer
    (check,) = docker_checks(info)
    assert all(name in check.detail for name in info["Runtimes"])
    if shutil.which("nvidia-container-runtime-hook") is None and "nvidia" not in info["Runtimes"]:
        assert check.status == "fail" and "nvidia-ctk runtime configure" in check.fix
    (with_runtime,) = docker_checks({**info, "Runtimes": {**info["Runtimes"], "nvidia": {}}})
    assert with_runtime.status == "pass"


def test_the_doctor_command_prints_json_from_the_real_pynvml_on_the_stub(make_nvml_stub, redis_server, tmp_path):
    stub = make_nvml_stub(FLEET, mig_modes={1: (0, 0)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")}
    env |= {"PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", "doctor", "--json"],
        env={**env, **stub.env()},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr  # GPU 1 has MIG off
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert checks["driver version"]["status"] == "pass"
    assert checks["GPU 0 (NVIDIA H100 80GB HBM3): profiles and placements"]["status"] == "pass"
    assert checks["GPU 1 (NVIDIA A30): MIG mode"]["status"] == "fail"
    assert checks["GPU 1 (NVIDIA A30): profiles and placements"]["status"] == "pass"  # read with MIG off
    assert {"permissions", "PID namespace", "other NVML clients", "CDI devices"} <= set(checks)
    assert {"Docker GPU support", "Docker engine"} & set(checks)
    assert checks["Redis restart detection"]["status"] == "pass"
    for check in report["checks"]:  # the fields scripts read, and a fix for every failure
        assert set(check) == {"name", "status", "detail", "fix"} and check["status"] in ("pass", "warn", "fail")
        assert check["detail"] and (check["status"] != "fail" or check["fix"]), check


def test_the_agent_check_refuses_real_gpus_outside_the_host_pid_namespace(make_nvml_stub, tmp_path):
    container = _proc(tmp_path, pid_inode=4026532252)
    with GpuBackend(make_nvml_stub("node-a=1xA30-24GB").pynvml) as backend:
        with pytest.raises(NotInHostPidNamespace) as refused:
            require_host_pid_namespace(backend, container)
    assert "--pid=host" in str(refused.value) and "4026532252" in refused.value.detail
    simulated = GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path))
    require_host_pid_namespace(simulated, container)  # nothing hides simulated processes


def test_the_agent_command_refuses_to_start_in_a_child_pid_namespace(make_nvml_stub, tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("cannot create a PID namespace here (unshare needs root or user namespaces)")
    stub = make_nvml_stub("node-a=1xA30-24GB")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")}
    done = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-m", "prefect_mig.cli.main", "agent", "--once"],
        env={**env, **stub.env(), "PREFECT_MIG_STATE_DIR": str(tmp_path / "state")},  # were it to start
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--pid=host" in done.stderr and "Traceback" not in done.stderr


def test_doctor_fails_a_redis_that_would_hide_its_restarts(redis_server):
    """Restart detection reads the server's run_id from INFO: a Redis user without INFO, or a proxy
    that hides run_id, would let a restart that lost a grant go unseen."""
    import uuid

    from prefect_mig.cli.doctor import redis_checks, restart_detection

    (ok,) = redis_checks(redis_server.client())
    assert ok.status == "pass" and "run_id" in ok.detail
    user, password = f"doctor-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis_server.client()
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all", "-info"])
    try:
        limited = redis_server.client(username=user, password=password)
        (refused,) = redis_checks(limited)
        assert refused.status == "fail" and "ACL SETUSER <user> +info" in refused.fix
    finally:
        admin.acl_deluser(user)
    hidden = restart_detection({"redis_version": "7.2.4"})  # what such a proxy's INFO server parses to
    assert hidden.status == "fail" and "run_id" in hidden.detail and hidden.fix
