"""A task body as an attacker: it cannot write the image, gain capabilities, fork without bound,
reach the network or see another slice."""

from __future__ import annotations

import threading
import time
import uuid

import docker
import docker.errors
import pytest

from prefect_mig.launchers import ContainerSettings, DockerLauncher
from prefect_mig.launchers.docker import LABEL_PREFIX


def probe():
    """What a hostile body can do inside its container."""
    import os

    def can_write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return True
        except OSError:
            return False

    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    pids_max = next(
        (open(p).read().strip() for p in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max") if os.path.exists(p)),
        None,
    )
    return {
        "root_fs": can_write("/usr/evil") or can_write("/etc/evil"),
        "tmp": can_write("/tmp/scratch"),
        "cap_eff": int(status["CapEff"].strip(), 16),
        "cap_bnd": int(status["CapBnd"].strip(), 16),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "pids_max": pids_max,
        "uid": os.getuid(),
        "nets": sorted(os.listdir("/sys/class/net")),
        "gpus": (os.environ["NVIDIA_VISIBLE_DEVICES"], os.environ["CUDA_VISIBLE_DEVICES"]),
    }


def nap():
    import time

    time.sleep(3)
    return "rested"


def test_a_body_cannot_write_the_root_fs_gain_capabilities_or_see_another_slice(python_image, docker_client):
    seen = DockerLauncher(ContainerSettings(image=python_image)).run(probe, mig_uuid="MIG-only-this")
    assert seen["root_fs"] is False and seen["tmp"] is True
    assert seen["cap_eff"] == 0 and seen["cap_bnd"] == 0
    assert seen["no_new_privs"] == "1"
    assert seen["pids_max"] == "4096"
    assert seen["nets"] == ["lo"]
    assert seen["gpus"] == ("MIG-only-this", "MIG-only-this")


def test_the_runtime_volume_goes_with_its_container(python_image, docker_client):
    run = uuid.uuid4().hex[:10]
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(DockerLauncher(ContainerSettings(image=python_image)).run(nap, mig_uuid="MIG-x", labels={"run": run}))
    )
    worker.start()
    volumes: list[str] = []
    deadline = time.monotonic() + 120
    while not volumes and worker.is_alive() and time.monotonic() < deadline:
        for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}run={run}"}, ignore_removed=True):
            volumes = [m["Name"] for m in c.attrs["Mounts"] if m["Type"] == "volume"]
        time.sleep(0.1)
    worker.join(120)
    assert result == ["rested"] and len(volumes) == 1
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volumes[0])


@pytest.mark.parametrize("user", ["65534:65534"])
def test_a_body_can_run_as_a_non_root_user(python_image, user):
    seen = DockerLauncher(ContainerSettings(image=python_image, user=user)).run(probe, mig_uuid="MIG-x")
    assert seen["uid"] == 65534 and seen["root_fs"] is False and seen["tmp"] is True


def test_each_hardening_can_be_loosened_for_a_body_that_needs_it(python_image):
    loose = ContainerSettings(image=python_image, read_only_root=False, no_new_privileges=False, cap_add=["ALL"], pids_limit=None)
    seen = DockerLauncher(loose).run(probe, mig_uuid="MIG-x")
    assert seen["root_fs"] is True and seen["cap_eff"] != 0 and seen["no_new_privs"] == "0"
    assert seen["pids_max"] in (None, "max")
    kept = DockerLauncher(ContainerSettings(image=python_image, cap_add=["CHOWN"])).run(probe, mig_uuid="MIG-x")
    assert kept["cap_eff"] == 1 << 0  # CAP_CHOWN is bit 0


def test_a_task_runner_and_its_block_loosen_the_confinement_with_container_options(cluster):
    """Root is read-only for a body by default; `container_options` (on the runner, or the
    MigCluster block) gives it back, and a wrong option fails when the runner is made, naming it."""
    import pytest
    from prefect import flow

    from prefect_mig import MigTaskRunner, task
    from prefect_mig.errors import ConfigError

    def write_root() -> str:
        try:
            with open("/written-by-the-body", "w") as f:
                f.write("x")
            return "written"
        except OSError as exc:
            return type(exc).__name__

    confined = task(task_runner=MigTaskRunner(profile="1g.10gb"))(write_root)
    loosened = task(task_runner=MigTaskRunner(profile="1g.10gb", container_options={"read_only_root": False}))(write_root)

    @flow
    def pipeline():
        return confined(), loosened()

    assert pipeline() == ("OSError", "written")
    with pytest.raises(ConfigError, match="read_only_rot"):
        MigTaskRunner(profile="1g.10gb", container_options={"read_only_rot": False})
    with pytest.raises(ConfigError, match="pids_limit"):
        MigTaskRunner(profile="1g.10gb", container_options={"pids_limit": 1})


def test_the_blocks_container_options_reach_the_runners_containers_and_the_runners_own_win(redis_server, docker_client):
    from prefect_mig import MigTaskRunner
    from prefect_mig.blocks import MigCluster

    block = MigCluster(redis_url=redis_server.url, container_options={"read_only_root": False, "pids_limit": 256})
    settings = MigTaskRunner(profile="1g.10gb", cluster=block, container_options={"pids_limit": 512})._new_launcher(None).settings
    assert (settings.read_only_root, settings.pids_limit) == (False, 512)
