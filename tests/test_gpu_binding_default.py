"""Task containers get their GPU by default wherever a real NVIDIA driver answers.

The subprocesses load the C NVML stub as ``libnvidia-ml.so.1`` (``LD_LIBRARY_PATH``), so for them a
driver answers; with the default ``PREFECT_MIG_BACKEND=auto`` that must mean a DeviceRequest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

RUNTIME_OF_A_RUNNER_WITHOUT_CLUSTER = """
from prefect_mig.integrations.prefect.runner import MigTaskRunner
print(MigTaskRunner(profile="1g.10gb")._new_launcher(None).settings.gpu_runtime)
"""


def _run(script: str, env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_MIG_", "LD_LIBRARY_PATH", "NVML_STUB"))}
    done = subprocess.run(
        [sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["auto", "nvml"])
def test_a_runner_on_a_host_with_a_driver_binds_containers_to_the_gpu(make_nvml_stub, backend):
    env = {**make_nvml_stub("node-a=1xH100-80GB").env(), "PREFECT_MIG_BACKEND": backend}
    assert _run(RUNTIME_OF_A_RUNNER_WITHOUT_CLUSTER, env) == "nvidia"


def test_a_runner_on_the_simulated_fleet_binds_nothing():
    assert _run(RUNTIME_OF_A_RUNNER_WITHOUT_CLUSTER, {"PREFECT_MIG_BACKEND": "auto"}) == "none"


def test_the_default_block_binds_containers_where_a_driver_answers(make_nvml_stub):
    script = "from prefect_mig.gpu import default_gpu_runtime\nfrom prefect_mig.settings import load_settings\n"
    script += "print(default_gpu_runtime(load_settings()))"  # what blocks/create_defaults.py writes
    env = {**make_nvml_stub("node-a=1xH100-80GB").env(), "PREFECT_MIG_BACKEND": "auto"}
    assert _run(script, env) == "nvidia"
