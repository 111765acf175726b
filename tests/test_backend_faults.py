"""What the real driver does that a happy path never shows, injected through the C NVML stub under
the real pynvml: NVML clients that are not processes, a non-root caller, PIDs hidden by a PID
namespace, a misreported ``instanceCount``, a driver older than nvidia-ml-py, and calls that fail
half-way. The backend must answer each with a typed error, never leave a GPU instance without its
compute instance, and apply a layout completely or not at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.errors import (
    BackendError,
    InstanceBusy,
    LayoutNotApplied,
    NoPermission,
    NvmlUnavailable,
)
from prefect_mig.gpu import GpuBackend
from prefect_mig.model import Layout
from prefect_mig.testing.nvml_stub import NvmlStub

IN_USE, NO_PERMISSION, FUNCTION_NOT_FOUND, INSUFFICIENT_RESOURCES = 19, 4, 13, 23
H100 = "node-a=1xH100-80GB"


@pytest.fixture
def stub(make_nvml_stub) -> NvmlStub:
    return make_nvml_stub(H100, layouts={0: "3g.40gb@0 + 2g.20gb@4 + 1g.10gb@6"})


@pytest.fixture
def backend(stub):
    with GpuBackend(stub.pynvml) as backend:
        yield backend


def _by_placement(backend) -> dict[str, tuple[int, int | None, str | None]]:
    return {str(m): (m.gpu_instance_id, m.compute_instance_id, m.mig_uuid) for m in backend.instances(0)}


def test_a_slice_held_by_a_non_process_nvml_client_is_busy_and_stays_whole(stub, backend):
    target = next(m for m in backend.instances(0) if str(m) == "2g.20gb@4")
    stub.hold(0, target.gpu_instance_id)  # DCGM / dcgm-exporter: no process, still IN_USE
    before = _by_placement(backend)
    with pytest.raises(InstanceBusy) as refused:
        backend.destroy(0, target.gpu_instance_id)
    assert "NVML client" in str(refused.value) and "DCGM" in str(refused.value)
    assert _by_placement(backend) == before


def test_a_gpu_instance_that_refuses_to_go_after_its_compute_instance_went_gets_one_back(stub, backend):
    target = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    stub.fail_next("nvmlGpuInstanceDestroy", IN_USE)
    with pytest.raises(InstanceBusy) as refused:
        backend.destroy(0, target.gpu_instance_id)
    assert "compute instance was re-created" in str(refused.value)
    (after,) = [m for m in backend.instances(0) if str(m) == "1g.10gb@6"]
    assert after.compute_instance_id is not None and after.mig_uuid, "a GI without a CI is never leasable"
    assert after.mig_uuid in backend.processes(0)


def test_apply_layout_repairs_a_kept_gpu_instance_that_has_no_compute_instance(stub, backend):
    target = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    ci = backend.nvml.nvmlDeviceGetGpuInstanceById(backend.nvml.nvmlDeviceGetHandleByIndex(0), target.gpu_instance_id)
    for handle in backend._compute_instances(ci):  # left so by a crash or another tool
        backend.nvml.nvmlComputeInstanceDestroy(handle)
    assert _by_placement(backend)["1g.10gb@6"][2] is None
    backend.apply_layout(0, backend.layout(0))
    assert all(uuid for _, _, uuid in _by_placement(backend).values())


def test_a_layout_change_that_fails_half_way_is_rolled_back_and_says_what_changed(stub, backend):
    model = backend.gpu_model(0)
    held = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    stub.hold(0, held.gpu_instance_id)  # invisible to the process check: found only when destroyed
    before = {str(m) for m in backend.instances(0)}
    with pytest.raises(LayoutNotApplied) as refused:
        backend.apply_layout(0, Layout.parse(model.name, "7g.80gb@0"))
    assert isinstance(refused.value.cause, InstanceBusy)
    assert {str(m) for m in backend.instances(0)} == before
    assert refused.value.rolled_back and refused.value.rollback_error is None
    assert "2g.20gb@4" in str(refused.value) and "restored" in str(refused.value)


def test_a_failing_rollback_does_not_hide_the_original_error(stub, backend):
    model = backend.gpu_model(0)
    held = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    stub.hold(0, held.gpu_instance_id)
    stub.fail_next("nvmlDeviceCreateGpuInstanceWithPlacement", INSUFFICIENT_RESOURCES, times=5)
    with pytest.raises(LayoutNotApplied) as refused:
        backend.apply_layout(0, Layout.parse(model.name, "7g.80gb@0"))
    assert isinstance(refused.value.cause, InstanceBusy)
    assert not refused.value.rolled_back and refused.value.rollback_error
    assert "could not be restored" in str(refused.value)


def test_a_busy_process_hidden_by_a_pid_namespace_is_still_refused_and_nothing_changes(stub, backend):
    model = backend.gpu_model(0)
    victim = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    stub.attach_process(victim.mig_uuid, 4242)
    stub.hide_pids()  # an agent in a container without --pid=host lists no process
    assert backend.processes(0)[victim.mig_uuid] == []
    before = {str(m) for m in backend.instances(0)}
    with pytest.raises((InstanceBusy, LayoutNotApplied)):
        backend.apply_layout(0, Layout.parse(model.name, "7g.80gb@0"))
    assert {str(m) for m in backend.instances(0)} == before


@pytest.mark.parametrize("call", ["gpu_model", "instances", "layout"])
def test_reads_by_a_non_root_caller_raise_no_permission_with_the_fix(stub, call):
    stub.non_root()
    with GpuBackend(stub.pynvml) as backend, pytest.raises(NoPermission) as refused:
        getattr(backend, call)(0)
    assert "root" in str(refused.value) and "capabilities/mig" in str(refused.value)


def test_the_cli_shows_a_non_root_caller_a_message_not_a_traceback(make_nvml_stub):
    stub = make_nvml_stub(H100, layouts={0: "3g.40gb@0"})
    done = subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", "gpus"],
        env={**_base_env(), **stub.env(non_root=True)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "root" in done.stderr


def test_a_driver_older_than_nvidia_ml_py_is_a_typed_error(old_driver_nvml_stub_library, tmp_path):
    stub = NvmlStub(H100, library=old_driver_nvml_stub_library, work_dir=tmp_path, layouts={0: "7g.80gb@0"})
    with GpuBackend(stub.pynvml) as backend, pytest.raises(NvmlUnavailable) as refused:
        backend.processes(0)
    assert "driver" in str(refused.value) and "nvidia-ml-py" in str(refused.value)


def test_a_driver_without_placement_calls_says_which_driver_is_needed(stub, backend):
    stub.fail_next("nvmlDeviceCreateGpuInstanceWithPlacement", FUNCTION_NOT_FOUND)
    backend.apply_layout(0, Layout(gpu_model=backend.gpu_model(0).name))
    with pytest.raises(NvmlUnavailable) as refused:
        backend.create(0, "1g.10gb", 0)
    assert "R460" in str(refused.value)


@pytest.mark.parametrize("reported", [1, 0])
def test_a30_keeps_the_catalog_instance_count_when_nvml_misreports_it(make_nvml_stub, reported):
    stub = make_nvml_stub("node-a=1xA30-24GB", reported_instance_count={"1g.6gb": reported})
    with GpuBackend(stub.pynvml) as backend:
        assert backend.gpu_model(0).profile("1g.6gb").max_instances == 4
        four = Layout.parse("A30-24GB", "1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3")
        backend.apply_layout(0, four)
        assert backend.layout(0).instances == four.instances


def test_unexpected_nvml_errors_are_backend_errors_naming_the_call(stub, backend):
    stub.fail_next("nvmlDeviceGetMigDeviceHandleByIndex", 999)
    with pytest.raises(BackendError) as refused:
        backend.processes(0)
    assert "Unknown" in str(refused.value) or "999" in str(refused.value)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_MIG_")}


def test_a_compute_instance_that_fails_whose_gpu_instance_will_not_go_says_both_and_is_repaired_later(make_nvml_stub):
    stub = make_nvml_stub(H100)
    with GpuBackend(stub.pynvml) as backend:
        stub.fail_next("nvmlGpuInstanceCreateComputeInstance", INSUFFICIENT_RESOURCES)
        stub.fail_next("nvmlGpuInstanceDestroy", IN_USE)  # DCGM grabbed the new GPU instance meanwhile
        with pytest.raises(BackendError) as refused:
            backend.create(0, "3g.40gb", 4)
        assert refused.value.nvml_code == INSUFFICIENT_RESOURCES, "the compute instance's failure is the cause"
        assert "3g.40gb@4" in str(refused.value) and "without a compute instance" in str(refused.value)
        (half,) = backend.instances(0)
        assert (str(half), half.mig_uuid) == ("3g.40gb@4", None)
        backend.apply_layout(0, backend.layout(0))  # the next layout change repairs it
        (whole,) = backend.instances(0)
        assert whole.mig_uuid and whole.gpu_instance_id == half.gpu_instance_id


def test_a_layout_change_whose_repair_of_a_kept_instance_fails_is_rolled_back_and_says_what_changed(stub, backend):
    kept = next(m for m in backend.instances(0) if str(m) == "1g.10gb@6")
    gi = backend.nvml.nvmlDeviceGetGpuInstanceById(backend.nvml.nvmlDeviceGetHandleByIndex(0), kept.gpu_instance_id)
    for ci in backend._compute_instances(gi):  # left so by a crash or another tool
        backend.nvml.nvmlComputeInstanceDestroy(ci)
    stub.fail_next("nvmlGpuInstanceCreateComputeInstance", INSUFFICIENT_RESOURCES)  # the repair fails once
    with pytest.raises(LayoutNotApplied) as refused:
        backend.apply_layout(0, Layout.parse(backend.gpu_model(0).name, "3g.40gb@0 + 1g.10gb@6"))
    assert refused.value.destroyed == ["2g.20gb@4"] and refused.value.rolled_back
    assert refused.value.cause.nvml_code == INSUFFICIENT_RESOURCES
    assert "2g.20gb@4" in {str(m) for m in backend.instances(0)}, "what went was restored"


def _drop_compute_instance(backend, placement: str):
    """Leave a GPU instance without its compute instance, as an agent killed between the two creates."""
    half = next(m for m in backend.instances(0) if str(m) == placement)
    gi = backend.nvml.nvmlDeviceGetGpuInstanceById(backend.nvml.nvmlDeviceGetHandleByIndex(0), half.gpu_instance_id)
    for ci in backend._compute_instances(gi):
        backend.nvml.nvmlComputeInstanceDestroy(ci)


def test_the_agent_gives_a_half_made_slice_its_compute_instance_back_and_publishes_it(stub, backend, alloc):
    _drop_compute_instance(backend, "1g.10gb@6")
    agent = NodeAgent(backend, alloc, node="node-a")
    agent.publish()
    assert "1g.10gb" not in {s["profile"] for s in alloc.status()["slices"]}  # no MIG UUID: not leasable
    agent.tick()  # sees it half-made (it may be a create under way in another process)
    assert _by_placement(backend)["1g.10gb@6"][2] is None
    agent.tick()  # still half-made: repairs it
    assert {(s["profile"], s["start"]) for s in alloc.status()["slices"]} == {("3g.40gb", 0), ("2g.20gb", 4), ("1g.10gb", 6)}


def test_a_desired_layout_already_in_place_but_half_made_is_applied_not_skipped(stub, backend, alloc):
    agent = NodeAgent(backend, alloc, node="node-a")
    agent.publish()
    gpu = backend.gpu(0)
    _drop_compute_instance(backend, "2g.20gb@4")  # the agent died half way through this layout
    alloc.set_desired(gpu.uuid, str(backend.layout(0)), kind="incremental")
    assert agent.apply_desired(0, gpu.uuid) == "applied"
    assert all(m.mig_uuid for m in backend.instances(0)), "no GPU instance stays without a compute instance"


@pytest.mark.parametrize("call", ["nvmlComputeInstanceGetInfo_v2", "nvmlGpuInstanceGetInfo"])
@pytest.mark.parametrize("code", [2, 6])  # InvalidArgument, NotFound
def test_an_instance_destroyed_by_another_process_mid_listing_does_not_fail_a_reader(stub, backend, call, code):
    """A listing is many NVML calls; an instance that another process's carve destroys between two
    of them answers InvalidArgument (its handle) or NotFound. A reader (status, doctor, an agent
    of another host looking) failed with BackendError, as a test's view did once mid-carve; the
    listing is taken again instead."""
    before = _by_placement(backend)
    stub.fail_next(call, code)
    assert _by_placement(backend) == before


def test_a_listing_that_keeps_failing_is_still_an_error(stub, backend):
    stub.fail_next("nvmlComputeInstanceGetInfo_v2", 2, times=5)  # as many as the listing is tried
    with pytest.raises(BackendError, match="list the MIG instances of GPU 0"):
        backend.instances(0)
