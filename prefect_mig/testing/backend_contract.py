"""The GPU backend's contract, as test suites any NVML library must pass.

`GpuBackendReadContract` only reads: it runs on real hardware too (``tests/test_backend_on_real_nvml.py``).
`GpuBackendContract` adds creating and destroying instances; it runs on the simulated NVML (never
on a real card in tests: changing a GPU's layout is not a test's business).

A subclass provides the `nvml` fixture (a pynvml-compatible library) and, for the write part,
`attach_process` / `detach_process` to put a process on a MIG device::

    class TestBackendOnSimulatedNvml(GpuBackendContract):
        @pytest.fixture
        def nvml(self, tmp_path):
            return SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
"""

from __future__ import annotations

import ctypes

import pytest

from prefect_mig.errors import InstanceBusy, InstanceNotFound, MigDisabled, PlacementConflict, UnknownProfile
from prefect_mig.gpu import GpuBackend
from prefect_mig.model import Layout, catalog, creatable, validate_layout


class GpuBackendReadContract:
    """What the backend reports must be true of any MIG GPU."""

    @pytest.fixture
    def nvml(self):  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    @pytest.fixture
    def backend(self, nvml):
        with GpuBackend(nvml) as backend:
            yield backend

    @pytest.fixture
    def mig_gpu(self, backend) -> int:
        """Index of the first GPU with MIG mode on."""
        for gpu in backend.gpus():
            if gpu.mig_enabled:
                return gpu.index
        pytest.skip("no GPU with MIG mode on")

    def test_every_gpu_has_a_uuid_a_name_and_memory(self, backend):
        gpus = backend.gpus()
        assert gpus, "the backend found no GPU"
        for gpu in gpus:
            assert gpu.uuid.startswith("GPU-")
            assert gpu.device_name
            assert gpu.memory_total_mib > 1024
        assert len({g.uuid for g in gpus}) == len(gpus)

    def test_profiles_read_from_nvml_have_placements_inside_the_gpu_and_match_the_catalog(self, backend):
        """Whatever the MIG mode (the driver answers these reads with MIG off too): every MIG GPU's
        profiles fit the GPU, and a model the catalog lists has exactly the catalog's geometry."""
        capable = [g for g in backend.gpus() if g.mig_supported]
        if not capable:
            pytest.skip("no GPU with MIG")
        for gpu in capable:
            model = backend.offered_model(gpu.index)
            assert model.profiles
            for p in model.profiles:
                assert p.placement_starts, p.name
                assert max(p.placement_starts) + p.placement_size <= model.memory_slices
                assert p.memory_mib > 0 and p.max_instances >= 1
            assert model.memory_slices in (4, 8)
            known = catalog().get(gpu.gpu_model) if gpu.gpu_model else None
            if known is not None:
                def geometry(m):
                    return {(p.id, p.name, p.compute_slices, p.memory_mib, p.placement_starts, p.placement_size)
                            for p in m.profiles}
                assert geometry(model) == geometry(known), f"GPU {gpu.index} ({gpu.device_name})"

    def test_current_layout_is_valid_and_each_slice_has_a_unique_mig_uuid(self, backend, mig_gpu):
        model = backend.gpu_model(mig_gpu)
        instances = backend.instances(mig_gpu)
        validate_layout(model, [m.placement for m in instances])
        uuids = [m.mig_uuid for m in instances if m.mig_uuid]
        assert all(u.startswith("MIG-") for u in uuids)
        assert len(set(uuids)) == len(uuids)

    def test_processes_are_listed_per_mig_device_of_the_layout(self, backend, mig_gpu):
        listed = backend.processes(mig_gpu)
        assert set(listed) == {m.mig_uuid for m in backend.instances(mig_gpu) if m.mig_uuid}

    def test_an_h100_80gb_reports_the_engines_of_each_profile_that_a_real_one_reports(self, backend, nvml):
        """(copy, decoder, encoder, JPEG, OFA) per profile, as a real H100 80GB HBM3 on driver
        580.159.04 reported them, MIG mode off (2026-11-27): no NVENC under MIG, the OFA only in
        +me and 7g."""
        h100s = [gpu.index for gpu in backend.gpus() if gpu.gpu_model == "H100-80GB"]
        if not h100s:
            pytest.skip("engine counts were seen on an H100-80GB only")
        for index in h100s:
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            engines = {}
            for p in backend.offered_model(index).profiles:  # whatever the MIG mode
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, p.nvml_profile)
                engines[p.name] = (info.copyEngineCount, info.decoderCount, info.encoderCount, info.jpegCount,
                                   info.ofaCount)
            assert engines == {
                "1g.10gb": (1, 1, 0, 1, 0), "1g.10gb+me": (1, 1, 0, 1, 1), "1g.20gb": (1, 1, 0, 1, 0),
                "2g.20gb": (2, 2, 0, 2, 0), "3g.40gb": (3, 3, 0, 3, 0), "4g.40gb": (4, 4, 0, 4, 0),
                "7g.80gb": (8, 7, 0, 7, 1),
            }, f"GPU {index}"


class GpuBackendContract(GpuBackendReadContract):
    """Creating and destroying instances (changes the GPU)."""

    def attach_process(self, nvml, mig_uuid: str, pid: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def detach_process(self, nvml, mig_uuid: str, pid: int) -> None:  # pragma: no cover
        raise NotImplementedError

    @pytest.fixture
    def empty_gpu(self, backend, mig_gpu) -> int:
        backend.apply_layout(mig_gpu, Layout(gpu_model=backend.gpu_model(mig_gpu).name))
        return mig_gpu

    def test_create_with_explicit_placement_returns_a_bound_slice(self, backend, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        big = max((p for p in model.classic_profiles if len(p.placement_starts) > 1), key=lambda p: p.memory_slices)
        start = big.placement_starts[-1]
        made = backend.create(empty_gpu, big.name, start)
        assert (made.profile, made.start, made.size) == (big.name, start, big.placement_size)
        assert made.mig_uuid and made.mig_uuid.startswith("MIG-")
        assert [str(m) for m in backend.instances(empty_gpu)] == [f"{big.name}@{start}"]

    def test_overlapping_create_is_refused_and_says_where_the_profile_fits(self, backend, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        one = min(model.classic_profiles, key=lambda p: p.memory_slices)
        two = next(p for p in model.classic_profiles if p.memory_slices == 2 * one.memory_slices)
        backend.create(empty_gpu, one.name, 0)
        with pytest.raises(PlacementConflict) as refused:
            backend.create(empty_gpu, two.name, 0)
        assert refused.value.profile == two.name and refused.value.start == 0
        assert f"{two.name}@{two.placement_starts[1]}" in str(refused.value)
        assert [str(m) for m in backend.instances(empty_gpu)] == [f"{one.name}@0"]

    def test_a_start_that_is_not_a_placement_is_refused_before_nvml(self, backend, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        two = next(p for p in model.classic_profiles if p.memory_slices == 2)
        with pytest.raises(PlacementConflict) as refused:
            backend.create(empty_gpu, two.name, 1)
        assert "may start only at" in str(refused.value)
        assert backend.instances(empty_gpu) == []

    def test_unknown_profile_lists_the_gpus_profiles(self, backend, empty_gpu):
        with pytest.raises(UnknownProfile) as refused:
            backend.create(empty_gpu, "5g.1gb", 0)
        assert set(refused.value.known) == set(backend.gpu_model(empty_gpu).profile_names)

    def test_destroy_frees_the_range_for_another_profile(self, backend, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        one = min(model.classic_profiles, key=lambda p: p.memory_slices)
        made = backend.create(empty_gpu, one.name, 0)
        backend.destroy(empty_gpu, made.gpu_instance_id)
        assert backend.instances(empty_gpu) == []
        whole = max(model.classic_profiles, key=lambda p: p.memory_slices)
        assert backend.create(empty_gpu, whole.name, 0).profile == whole.name

    def test_destroy_is_refused_while_a_process_runs_on_the_slice(self, backend, nvml, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        one = min(model.classic_profiles, key=lambda p: p.memory_slices)
        made = backend.create(empty_gpu, one.name, 0)
        self.attach_process(nvml, made.mig_uuid, 4242)
        with pytest.raises(InstanceBusy) as refused:
            backend.destroy(empty_gpu, made.gpu_instance_id)
        assert "4242" in str(refused.value) and refused.value.gpu_instance_id == made.gpu_instance_id
        assert [m.mig_uuid for m in backend.instances(empty_gpu)] == [made.mig_uuid]
        assert [p.pid for p in backend.processes(empty_gpu)[made.mig_uuid]] == [4242]
        self.detach_process(nvml, made.mig_uuid, 4242)
        backend.destroy(empty_gpu, made.gpu_instance_id)
        assert backend.instances(empty_gpu) == []

    def test_destroying_a_missing_instance_says_so(self, backend, empty_gpu):
        with pytest.raises(InstanceNotFound) as refused:
            backend.destroy(empty_gpu, 61)
        assert refused.value.gpu_instance_id == 61

    def test_apply_layout_keeps_instances_that_stay_and_fills_the_rest(self, backend, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        layouts = [layout for layout in _maximal(model) if len(layout.instances) >= 3]
        first, second = layouts[0], layouts[-1]
        backend.apply_layout(empty_gpu, first)
        kept = {m.placement: m.mig_uuid for m in backend.instances(empty_gpu)}
        destroyed, created = backend.apply_layout(empty_gpu, second)
        assert backend.layout(empty_gpu).instances == second.instances
        after = {m.placement: m.mig_uuid for m in backend.instances(empty_gpu)}
        for placement in set(first.instances) & set(second.instances):
            assert after[placement] == kept[placement], "an instance that stays must not be re-created"
        assert {m.placement for m in destroyed} == set(first.instances) - set(second.instances)
        assert {m.placement for m in created} == set(second.instances) - set(first.instances)

    def test_apply_layout_with_a_busy_instance_to_remove_changes_nothing(self, backend, nvml, empty_gpu):
        model = backend.gpu_model(empty_gpu)
        layouts = _maximal(model)
        backend.apply_layout(empty_gpu, layouts[0])
        before = backend.instances(empty_gpu)
        victim = before[-1]
        self.attach_process(nvml, victim.mig_uuid, 777)
        only_first = Layout.of(model, [creatable(model, [], "classic")[0]])  # drops the victim
        try:
            with pytest.raises(InstanceBusy):
                backend.apply_layout(empty_gpu, only_first)
            assert backend.instances(empty_gpu) == before
        finally:
            self.detach_process(nvml, victim.mig_uuid, 777)

    def test_with_mig_off_nvml_still_answers_geometry_reads_and_refuses_to_create(self, backend, nvml, empty_gpu):
        """As a real H100 80GB HBM3 on driver 580.159.04 answered with MIG mode off (2026-11-27)."""
        model = backend.gpu_model(empty_gpu)  # as NVML reports it with MIG on
        h = nvml.nvmlDeviceGetHandleByIndex(empty_gpu)
        nvml.nvmlDeviceSetMigMode(h, nvml.NVML_DEVICE_MIG_DISABLE)
        assert list(nvml.nvmlDeviceGetMigMode(h)) == [0, 0]
        by_enum = {p.nvml_profile: p for p in model.profiles}
        for enum in range(19):
            if enum in by_enum:
                p, info = by_enum[enum], nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, enum)
                assert (info.id, info.sliceCount, info.memorySizeMB, info.multiprocessorCount or None) == (
                    p.id, p.compute_slices, p.memory_mib, p.sm_count
                ), p.name
                assert _placements(nvml, h, p.id) == (list(p.placement_starts), p.placement_size), p.name
                assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(h, p.id) == p.max_instances, p.name
                assert _gpu_instance_count(nvml, h, p.id) == 0, p.name
            else:
                refusal = nvml.NVMLError_NotSupported if enum < 17 else nvml.NVMLError_InvalidArgument
                with pytest.raises(refusal):
                    nvml.nvmlDeviceGetGpuInstanceProfileInfoV(h, enum)
        unknown = next(i for i in range(64) if i not in {p.id for p in model.profiles})
        for profile_id in (unknown, 99):
            with pytest.raises(nvml.NVMLError_InvalidArgument):
                _placements(nvml, h, profile_id)
            with pytest.raises(nvml.NVMLError_InvalidArgument):
                nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(h, profile_id)
            with pytest.raises(nvml.NVMLError_InvalidArgument):
                _gpu_instance_count(nvml, h, profile_id)
        with pytest.raises(nvml.NVMLError_NotFound):
            nvml.nvmlDeviceGetGpuInstanceById(h, 1)
        with pytest.raises(nvml.NVMLError_NotFound):
            nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)
        assert nvml.nvmlDeviceGetMaxMigDeviceCount(h) == 0
        assert list(nvml.nvmlDeviceGetComputeRunningProcesses(h)) == []
        whole = max(model.profiles, key=lambda p: p.memory_slices)
        place = nvml.c_nvmlGpuInstancePlacement_t()
        place.start, place.size = 0, whole.placement_size
        with pytest.raises(nvml.NVMLError_NotSupported):
            nvml.nvmlDeviceCreateGpuInstanceWithPlacement(h, whole.id, ctypes.byref(place))
        with type(backend)(nvml) as fresh:  # the backend's own cache aside
            assert not fresh.gpu(empty_gpu).mig_enabled
            assert fresh.offered_model(empty_gpu) == model  # what `prefect-mig doctor` reads with MIG off
            for carve in (
                lambda: fresh.create(empty_gpu, whole.name, 0),
                lambda: fresh.instances(empty_gpu),
                lambda: fresh.gpu_model(empty_gpu),
            ):
                with pytest.raises(MigDisabled) as refused:
                    carve()
                assert f"sudo nvidia-smi -i {empty_gpu} -mig 1" in str(refused.value)


def _placements(nvml, h, profile_id: int) -> tuple[list[int], int]:
    count = ctypes.c_uint(0)
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, profile_id, None, ctypes.byref(count))
    array = (nvml.c_nvmlGpuInstancePlacement_t * max(count.value, 1))()
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, profile_id, array, ctypes.byref(count))
    return [array[i].start for i in range(count.value)], (array[0].size if count.value else 0)


def _gpu_instance_count(nvml, h, profile_id: int) -> int:
    count = ctypes.c_uint(0)
    array = (nvml.c_nvmlGpuInstance_t * 8)()
    nvml.nvmlDeviceGetGpuInstances(h, profile_id, array, ctypes.byref(count))
    return count.value


def _maximal(model):
    from prefect_mig.model import enumerate_layouts

    return enumerate_layouts(model)
