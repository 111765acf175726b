"""Fixtures for the C NVML stub (`prefect_mig.testing.nvml_stub`): built once per session with gcc.

Without gcc the stub's tests skip, saying what to install; under CI they fail instead."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_mig.testing.nvml_stub import NvmlStub, build_stub


def _build(tmp_path_factory, **kw) -> Path:
    from tests.conftest import service_unavailable

    try:
        return build_stub(tmp_path_factory.mktemp("nvml-stub"), **kw)
    except RuntimeError as exc:
        service_unavailable(str(exc))


@pytest.fixture(scope="session")
def nvml_stub_library(tmp_path_factory) -> Path:
    """The stub ``libnvidia-ml.so.1``."""
    return _build(tmp_path_factory)


@pytest.fixture(scope="session")
def old_driver_nvml_stub_library(tmp_path_factory) -> Path:
    """The stub without the ``_v3`` process listing, like a driver older than nvidia-ml-py."""
    return _build(tmp_path_factory, old_driver=True)


@pytest.fixture
def make_nvml_stub(nvml_stub_library, tmp_path) -> Callable[..., NvmlStub]:
    """``make_nvml_stub("node-a=1xH100-80GB", **NvmlStub options)`` -> a fresh stub."""

    def make(fleet: str, **kw) -> NvmlStub:
        kw.setdefault("library", nvml_stub_library)
        return NvmlStub(fleet, work_dir=tmp_path, **kw)

    return make
