from __future__ import annotations

import prefect_mig
import prefect_mig.gpu
import prefect_mig.model


def test_every_exported_name_exists_and_the_list_is_curated():
    for module in (prefect_mig, prefect_mig.model, prefect_mig.gpu):
        assert module.__all__ == sorted(module.__all__), module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_top_level_names_are_the_ones_their_modules_define():
    assert prefect_mig.SliceRequirement is prefect_mig.model.SliceRequirement
    assert prefect_mig.GpuBackend is prefect_mig.gpu.GpuBackend
