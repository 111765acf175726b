"""The simulated NVML refuses what the driver refuses, keeps pynvml's signatures and shares state."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pynvml
import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefect_mig.gpu.simulated_nvml import API, SimulatedNvml, check_signatures
from prefect_mig.model import get_model


@pytest.fixture
def nvml(tmp_path):
    lib = SimulatedNvml("node-a=1xH100-80GB+1xA30-24GB,node-b=1xA100-40GB", state_dir=tmp_path)
    lib.nvmlInit()
    yield lib
    lib.nvmlShutdown()


def _place(start: int, size: int):
    """A placement as NVML takes it: ``const nvmlGpuInstancePlacement_t *`` (a pointer)."""
    p = pynvml.c_nvmlGpuInstancePlacement_t()
    p.start, p.size = start, size
    return ctypes.byref(p)


def _create(nvml, gpu: int, profile_id: int, start: int, size: int):
    return nvml.nvmlDeviceCreateGpuInstanceWithPlacement(nvml.nvmlDeviceGetHandleByIndex(gpu), profile_id, _place(start, size))


def test_a_placement_passed_by_value_is_refused_like_the_c_abi_would(nvml):
    # pynvml sets no argtypes: a struct goes by value, and NVML reads its bytes as an address
    by_value = pynvml.c_nvmlGpuInstancePlacement_t()
    by_value.start, by_value.size = 4, 4
    with pytest.raises(TypeError, match="by value"):
        nvml.nvmlDeviceCreateGpuInstanceWithPlacement(nvml.nvmlDeviceGetHandleByIndex(0), 9, by_value)
    gi = _create(nvml, 0, 9, 4, 4)
    assert nvml.nvmlGpuInstanceGetInfo(gi).placement.start == 4


def test_every_pynvml_function_the_simulation_offers_has_pynvml_signature():
    assert check_signatures() == []


def test_the_backend_calls_only_functions_the_simulation_offers():
    import re
    from pathlib import Path

    from prefect_mig.gpu import backend

    called = set(re.findall(r"self\.nvml\.(nvml[A-Za-z_0-9]+)\(", Path(backend.__file__).read_text()))
    assert called, "the backend calls no NVML function?"
    assert called <= set(API), called - set(API)


def test_calls_before_init_raise_uninitialized(tmp_path):
    lib = SimulatedNvml("n=1xA30-24GB", state_dir=tmp_path)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        lib.nvmlDeviceGetCount()


def test_each_node_sees_only_its_own_gpus(nvml, tmp_path):
    other = SimulatedNvml(nvml.fleet, node="node-b", state_dir=tmp_path)
    other.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2 and other.nvmlDeviceGetCount() == 1
    assert other.nvmlDeviceGetName(other.nvmlDeviceGetHandleByIndex(0)) == "NVIDIA A100-SXM4-40GB"
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        other.nvmlDeviceGetHandleByIndex(1)


def test_overlapping_instance_is_refused_with_insufficient_resources(nvml):
    _create(nvml, 0, 9, 4, 4)  # 3g.40gb@4
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        _create(nvml, 0, 14, 4, 2)  # 2g.20gb@4


def test_a_start_that_is_not_a_placement_is_refused_with_invalid_argument(nvml):
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        _create(nvml, 0, 14, 1, 2)  # 2g.20gb may start at 0, 2, 4
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        _create(nvml, 0, 14, 0, 3)  # wrong size


def test_a_second_media_engine_instance_is_refused(nvml):
    _create(nvml, 1, 21, 0, 1)  # A30 1g.6gb+me
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        _create(nvml, 1, 6, 2, 2)  # A30 2g.12gb+me


def test_profile_ids_of_another_family_are_refused(nvml):
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        _create(nvml, 1, 19, 0, 1)  # 19 is the H100's 1g, not an A30 profile


def test_profile_info_of_a_profile_the_gpu_lacks_is_not_supported(nvml):
    a30 = nvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfoV(a30, pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE)
    info = nvml.nvmlDeviceGetGpuInstanceProfileInfoV(a30, pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE)
    assert (info.id, info.sliceCount, info.memorySizeMB, info.name) == (0, 4, 23344, "MIG 4g.24gb")


def test_placements_are_reported_through_ctypes_arrays_like_the_driver(nvml):
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    count = ctypes.c_uint(0)
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 14, None, ctypes.byref(count))
    assert count.value == 3
    short = (pynvml.c_nvmlGpuInstancePlacement_t * 2)()
    count.value = 2
    with pytest.raises(pynvml.NVMLError_InsufficientSize):
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 14, short, ctypes.byref(count))
    array = (pynvml.c_nvmlGpuInstancePlacement_t * 3)()
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, 14, array, ctypes.byref(count))
    assert [(array[i].start, array[i].size) for i in range(count.value)] == [(0, 2), (2, 2), (4, 2)]


def test_with_mig_disabled_creating_a_gpu_instance_is_not_supported_but_its_profile_is_still_read(nvml):
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlDeviceSetMigMode(h, pynvml.NVML_DEVICE_MIG_DISABLE)
    assert nvml.nvmlDeviceGetMigMode(h) == [0, 0]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        _create(nvml, 0, 19, 0, 1)
    assert nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE).id == 19


def test_mig_mode_cannot_be_disabled_while_instances_exist(nvml):
    _create(nvml, 0, 19, 0, 1)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), pynvml.NVML_DEVICE_MIG_DISABLE)



def test_a_staged_mig_mode_stays_pending_and_is_refused_where_the_driver_refuses_it(nvml):
    """`stage_mig_mode` is `nvidia-smi -mig` on an A100/A30: the current mode stays until a reset."""
    h = nvml.nvmlDeviceGetHandleByIndex(1)
    nvml.stage_mig_mode(1, pynvml.NVML_DEVICE_MIG_DISABLE)
    assert nvml.nvmlDeviceGetMigMode(h) == [1, 0]
    nvml.stage_mig_mode(1, pynvml.NVML_DEVICE_MIG_ENABLE)  # undone
    assert nvml.nvmlDeviceGetMigMode(h) == [1, 1]
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.stage_mig_mode(1, 2)
    _create(nvml, 0, 19, 0, 1)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.stage_mig_mode(0, pynvml.NVML_DEVICE_MIG_DISABLE)
    assert nvml.nvmlDeviceGetMigMode(nvml.nvmlDeviceGetHandleByIndex(0)) == [1, 1]

def _full_ci(nvml, gi, slices_enum):
    info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfoV(gi, slices_enum, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
    return nvml.nvmlGpuInstanceCreateComputeInstance(gi, info.id)


def test_destroying_a_gpu_instance_with_compute_instances_is_in_use(nvml):
    gi = _create(nvml, 0, 19, 0, 1)
    ci = _full_ci(nvml, gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlGpuInstanceDestroy(gi)
    nvml.nvmlComputeInstanceDestroy(ci)
    nvml.nvmlGpuInstanceDestroy(gi)


def test_destroying_a_compute_instance_with_processes_is_in_use(nvml):
    gi = _create(nvml, 0, 9, 0, 4)
    ci = _full_ci(nvml, gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    uuid = nvml.nvmlDeviceGetUUID(mig)
    assert uuid.startswith("MIG-") and nvml.nvmlDeviceGetName(mig) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    nvml.attach_process(uuid, pid=99, used_memory_mib=1024)
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(mig)] == [99]
    assert nvml.nvmlDeviceGetMemoryInfo(mig).used == 1024 * 1024 * 1024
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlComputeInstanceDestroy(ci)
    nvml.detach_process(uuid, pid=99)
    nvml.nvmlComputeInstanceDestroy(ci)


def test_a_handle_to_a_destroyed_instance_is_stale(nvml):
    gi = _create(nvml, 0, 19, 0, 1)
    nvml.nvmlGpuInstanceDestroy(gi)
    _create(nvml, 0, 19, 0, 1)  # same id and place, a new instance
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlGpuInstanceGetInfo(gi)


def test_state_is_shared_with_another_process(nvml, tmp_path):
    _create(nvml, 0, 9, 4, 4)
    script = textwrap.dedent(
        f"""
        import ctypes, pynvml
        from prefect_mig.gpu.simulated_nvml import SimulatedNvml
        lib = SimulatedNvml({str(nvml.fleet)!r}, node="node-a", state_dir={str(tmp_path)!r})
        lib.nvmlInit()
        h = lib.nvmlDeviceGetHandleByIndex(0)
        count = ctypes.c_uint(0)
        arr = (pynvml.c_nvmlGpuInstance_t * 2)()
        lib.nvmlDeviceGetGpuInstances(h, 9, arr, ctypes.byref(count))
        info = lib.nvmlGpuInstanceGetInfo(arr[0])
        print(count.value, info.placement.start)
        p = pynvml.c_nvmlGpuInstancePlacement_t(); p.start, p.size = 0, 4
        lib.nvmlDeviceCreateGpuInstanceWithPlacement(h, 9, ctypes.byref(p))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "4"]
    count = ctypes.c_uint(0)
    arr = (pynvml.c_nvmlGpuInstance_t * 2)()
    nvml.nvmlDeviceGetGpuInstances(nvml.nvmlDeviceGetHandleByIndex(0), 9, arr, ctypes.byref(count))
    assert sorted(nvml.nvmlGpuInstanceGetInfo(arr[i]).placement.start for i in range(count.value)) == [0, 4]


class SimulatedNvmlMachine(RuleBasedStateMachine):
    """Random creates and destroys, straight on the simulated NVML: instances never overlap, and
    whatever it accepts or refuses matches the pure model's view of what fits."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.lib = SimulatedNvml("n=1xH100-80GB", state_dir=tempfile.mkdtemp())
        self.lib.nvmlInit()
        self.h = self.lib.nvmlDeviceGetHandleByIndex(0)
        self.model = get_model("H100-80GB")

    def _instances(self):
        found = []
        for p in self.model.profiles:
            count = ctypes.c_uint(0)
            arr = (pynvml.c_nvmlGpuInstance_t * 8)()
            self.lib.nvmlDeviceGetGpuInstances(self.h, p.id, arr, ctypes.byref(count))
            found += [arr[i] for i in range(count.value)]
        return found

    @rule(profile=st.sampled_from(get_model("H100-80GB").profiles), start=st.integers(0, 7))
    def create(self, profile, start):
        from prefect_mig.model import Placement, creatable

        occupied = [self._placement(gi) for gi in self._instances()]
        fits = Placement(profile=profile.name, start=start) in creatable(self.model, occupied, "all")
        try:
            _create_on(self.lib, self.h, profile.id, start, profile.placement_size)
            accepted = True
        except (pynvml.NVMLError_InsufficientResources, pynvml.NVMLError_InvalidArgument):
            accepted = False
        assert accepted == fits

    @rule(data=st.data())
    def destroy(self, data):
        instances = self._instances()
        if instances:
            self.lib.nvmlGpuInstanceDestroy(data.draw(st.sampled_from(instances)))

    def _placement(self, gi):
        from prefect_mig.model import Placement

        info = self.lib.nvmlGpuInstanceGetInfo(gi)
        return Placement(profile=self.model.profile(int(info.profileId)).name, start=info.placement.start)

    @invariant()
    def no_two_instances_overlap(self):
        from prefect_mig.model import validate_layout

        validate_layout(self.model, [self._placement(gi) for gi in self._instances()])


def _create_on(lib, h, profile_id, start, size):
    return lib.nvmlDeviceCreateGpuInstanceWithPlacement(h, profile_id, _place(start, size))


SimulatedNvmlMachine.TestCase.settings = hsettings(max_examples=60, stateful_step_count=25, deadline=None)
test_random_create_destroy_sequences_never_overlap = SimulatedNvmlMachine.TestCase


@pytest.mark.parametrize("fake", ["simulated", "C stub"])
def test_a_b200_reports_the_copy_engines_the_mig_user_guide_lists(fake, tmp_path, request):
    """No B200 was seen; NVIDIA's MIG user guide lists its copy engines per profile, so both fakes
    report those (shared/reference/mig-profiles.json), not one per compute slice."""
    fleet = "node-a=1xB200-180GB"
    if fake == "simulated":
        nvml = SimulatedNvml(fleet, state_dir=tmp_path)
    else:
        nvml = request.getfixturevalue("make_nvml_stub")(fleet).pynvml
    nvml.nvmlInit()
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(0)
        copy = {
            p.name: nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, p.nvml_profile).copyEngineCount
            for p in get_model("B200-180GB").profiles
        }
    finally:
        nvml.nvmlShutdown()
    assert copy == {"1g.23gb": 2, "1g.23gb+me": 2, "1g.45gb": 2, "2g.45gb": 3, "3g.90gb": 6, "4g.90gb": 8, "7g.180gb": 16}
