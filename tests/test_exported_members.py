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


def test_the_block_the_readme_loads_is_importable_from_the_top_level_as_the_runner_is():
    """A new-user trial wrote `from prefect_mig import MigCluster, MigTaskRunner` for the README's
    `MigTaskRunner(cluster=MigCluster.load("prod"))` and got an ImportError."""
    from prefect_mig import MigCluster
    from prefect_mig.blocks import MigCluster as in_its_module

    assert MigCluster is in_its_module
