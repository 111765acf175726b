"""GPU models as the backend reads them through the real pynvml on the C NVML stub: renamed
variants map to their catalog family, and a GPU the catalog does not list is usable by the name the
backend gives it, with the geometry NVML reports, in every process of the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.allocator.models import slice_record
from prefect_mig.errors import UnknownGpuModel
from prefect_mig.gpu import GpuBackend
from prefect_mig.gpu.host import pid_namespace
from prefect_mig.model import Layout, get_model
from prefect_mig.repartition.service import plan_from_allocator


def test_a_gpu_outside_the_catalog_gets_a_model_from_nvml_that_layouts_can_name(make_nvml_stub):
    stub = make_nvml_stub(
        "node-a=1xH100-80GB",
        device_names={0: "NVIDIA RTX PRO 6000 Blackwell Server Edition"},
        pci_device_ids={0: 0x2BB510DE},  # not listed in the catalog
    )
    with GpuBackend(stub.pynvml) as backend:
        assert backend.gpu(0).gpu_model is None  # not a catalog model
        model = backend.gpu_model(0)
        assert model.name == "RTX-PRO-6000-Blackwell-Server-Edition"
        assert "not in the catalog" in model.confidence
        assert get_model(model.name) is model
        assert {p.name for p in model.classic_profiles} >= {"1g.10gb", "3g.40gb", "7g.80gb"}
        target = Layout.parse(model.name, "3g.40gb@0 + 3g.40gb@4")
        backend.apply_layout(0, target)
        assert backend.layout(0).instances == target.instances


def test_renamed_variants_are_their_catalog_family(make_nvml_stub):
    stub = make_nvml_stub("node-a=1xH100-80GB+1xA100-80GB", device_names={0: "NVIDIA H800", 1: "NVIDIA A800-SXM4-80GB"})
    with GpuBackend(stub.pynvml) as backend:
        assert [g.gpu_model for g in backend.gpus()] == ["H100-80GB", "A100-80GB"]
        assert backend.gpu_model(0).name == "H100-80GB" and backend.gpu_model(0).confidence == "read from NVML"


def test_the_pci_device_id_names_the_model_when_the_driver_does_not_know_the_name(make_nvml_stub):
    stub = make_nvml_stub(
        "node-a=1xGH200-96GB", device_names={0: "NVIDIA Graphics Device"}, pci_device_ids={0: 0x232910DE}  # an H20
    )
    with GpuBackend(stub.pynvml) as backend:
        (gpu,) = backend.gpus()
        assert (gpu.gpu_model, gpu.pci_device_id) == ("GH200-96GB", 0x232910DE)
        assert backend.gpu_model(0).name == "GH200-96GB"


def test_a_model_built_from_nvml_is_published_so_the_planner_and_requesters_in_other_processes_know_it(
    make_nvml_stub, redis_server, redis_client, namespace, tmp_path
):
    """The agent process builds the model from NVML and publishes it with its inventory; a requester
    (this process), the planner and `status` (other processes) plan and lease on it; the agent
    applies the planned re-carve and the waiting request gets its slice."""
    if pid_namespace()[0] is False:
        pytest.skip("the agent refuses real NVML outside the host PID namespace (see test_doctor)")
    name = "RTX-PRO-4000-Blackwell-Test"
    stub = make_nvml_stub(
        "node-a=1xH100-80GB",  # its geometry, under a name and PCI id the catalog does not list
        device_names={0: f"NVIDIA {name.replace('-', ' ')}"},
        pci_device_ids={0: 0x2C3410DE},
        layouts={0: " + ".join(f"1g.10gb@{i}" for i in range(7))},
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")},
        **stub.env(),
        "PREFECT_MIG_REDIS_URL": redis_server.url,
        "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "250",
    }
    with pytest.raises(UnknownGpuModel):
        get_model(name)  # built in the agent's process only
    published = _cli("agent", "--once", "--layout", "none", env=env)
    assert published.returncode == 0, published.stdout + published.stderr

    cluster = Allocator(redis_client, namespace, queue_uncarved=True, wait_ttl_s=60)
    with ThreadPoolExecutor(1) as pool:  # a requester here waits for a kind no GPU is carved into yet
        waiting = pool.submit(cluster.acquire, SliceRequest(profile="3g.40gb", ttl_s=120), timeout_s=240)
        deadline = time.monotonic() + 60
        while not cluster.status()["queue"] and not waiting.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get_model(name).built_from_nvml  # loaded from Redis to check the request against it
        (queued,) = cluster.status()["queue"]
        assert queued["pkeys"] == [f"{name}/3g.40gb"]

        planned = _cli("repartition", "plan", "--json", env=env)
        assert planned.returncode == 0, planned.stderr
        (plan,) = json.loads(planned.stdout)
        assert plan["kind"] == "incremental" and "3g.40gb" in plan["target"]
        assert _cli("repartition", "apply", "--json", env=env).returncode == 0
        applied = _cli("agent", "--once", "--layout", "none", env=env)  # re-carves the stub's GPU
        assert applied.returncode == 0, applied.stdout + applied.stderr
        lease = waiting.result(timeout=240)
    assert (lease.slice.gpu_model, lease.slice.profile) == (name, "3g.40gb")

    shown = json.loads(_cli("status", "--json", env=env).stdout)
    assert shown["models"][name]["built_from_nvml"] and "3g.40gb" in shown["models"][name]["profiles"]
    assert f"GPU model {name}" in _cli("status", env=env).stdout
    other = _cli("lease", "acquire", "--gpu-model", name, "--profile", "1g.10gb", "--json", env=env)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["slice"]["gpu_model"] == name


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", *args], env=env, capture_output=True, text=True, timeout=180
    )


def test_only_models_built_from_nvml_are_published_and_a_bad_record_is_skipped(redis_client, namespace):
    cluster = Allocator(redis_client, namespace)
    h100 = get_model("H100-80GB")
    built = h100.model_copy(update={"name": "Published-Test-GPU", "built_from_nvml": True})
    assert cluster.publish_models([h100, built]) == 1  # the catalog ships with every process
    redis_client.hset(cluster.keys.models, mapping={
        "H100-80GB": h100.model_copy(update={"built_from_nvml": True}).model_dump_json(),  # may not shadow it
        "Broken": "{not json",
    })
    assert set(cluster.load_models()) == {"Published-Test-GPU"}
    assert get_model("H100-80GB") is h100 and get_model("published-test-gpu").built_from_nvml


def test_a_gpu_model_nobody_published_does_not_stop_requests_for_the_models_that_are_known(redis_client, namespace):
    cluster = Allocator(redis_client, namespace)
    cluster.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": ["3g.40gb@0"]})
    ghost = get_model("H100-80GB").model_copy(update={"name": "Unpublished-Test-GPU", "built_from_nvml": True})
    record = slice_record(  # an agent that does not publish its models (an older version)
        ghost, "1g.10gb", 0, node="node-b", gpu_uuid="GPU-ghost", gpu_index=0, gpu_instance_id=1, mig_uuid="MIG-ghost"
    )
    cluster.publish("node-b", [{"uuid": "GPU-ghost", "index": 0, "gpu_model": ghost.name}], [record])
    lease = cluster.try_acquire(SliceRequest(profile="3g.40gb"))
    assert lease.slice.gpu_model == "H100-80GB"
    (plan,) = plan_from_allocator(cluster, extra_demand={"H100-80GB/1g.10gb": 2})  # the planner skips that GPU
    assert plan.current.gpu_model == "H100-80GB"
