"""Every ```python example in a public docstring runs (on the simulated NVML, no GPU needed)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import textwrap

import pytest

import prefect_mig

FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _examples():
    for info in pkgutil.walk_packages(prefect_mig.__path__, "prefect_mig."):
        if ".testing" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        objects = [module, *[v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == module.__name__]]
        for obj in objects:
            for i, block in enumerate(FENCE.findall(inspect.getdoc(obj) or "")):
                yield pytest.param(textwrap.dedent(block), id=f"{getattr(obj, '__qualname__', info.name)}-{i}")


EXAMPLES = list(_examples())


def test_public_modules_carry_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("code", EXAMPLES)
def test_docstring_example_runs(code):
    exec(compile(code, "<docstring example>", "exec"), {})
