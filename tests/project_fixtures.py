"""A user's project on disk, for the tests of what travels with a call to a task container."""

from __future__ import annotations

import sys


def write_lazy_project(tmp_path, monkeypatch, prefix: str) -> None:
    """A flow file whose body (and a helper it calls, and a method of a class it uses) import sibling
    modules, a package and, through one of them, another module, when they run: the flow's process
    loads one of them (``<prefix>_loaded``) and never the others."""
    (tmp_path / f"{prefix}_dep.py").write_text("SUFFIX = '!'\n")
    (tmp_path / f"{prefix}_lazy.py").write_text(
        f"from {prefix}_dep import SUFFIX\n\ndef label(x):\n    if x < 0:\n        raise ValueError(f'negative {{x}}')\n"
        "    return f'label {x}{SUFFIX}'\n"
    )
    (tmp_path / f"{prefix}_pkg").mkdir()
    (tmp_path / f"{prefix}_pkg" / "__init__.py").write_text("")
    (tmp_path / f"{prefix}_pkg" / "sub.py").write_text("def twice(x):\n    return 2 * x\n")
    (tmp_path / f"{prefix}_helper.py").write_text("def plus_one(x):\n    return x + 1\n")
    (tmp_path / f"{prefix}_classdep.py").write_text("OFFSET = -1\n")
    (tmp_path / f"{prefix}_loaded.py").write_text(
        f"class Shift:\n    def by(self, x):\n        import {prefix}_classdep\n        return x + {prefix}_classdep.OFFSET\n"
    )
    (tmp_path / f"{prefix}_flow.py").write_text(
        f"import {prefix}_loaded\n\n"
        "def helper(x):\n"
        f"    import {prefix}_helper\n"
        f"    return {prefix}_helper.plus_one(x)\n\n"
        "def body(x):\n"
        f"    import {prefix}_lazy\n"
        f"    import {prefix}_loaded\n"
        f"    from {prefix}_pkg.sub import twice\n"
        f"    return {prefix}_lazy.label(twice(helper({prefix}_loaded.Shift().by(x + 1))))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("dep", "lazy", "pkg", "pkg.sub", "helper", "classdep", "loaded", "flow"):
        monkeypatch.delitem(sys.modules, f"{prefix}_{name}", raising=False)


def write_cached_loader(tmp_path, monkeypatch, name: str) -> None:
    """A flow module whose body calls a loader under `functools.cache` (the README's warm example)."""
    (tmp_path / f"{name}.py").write_text(
        "import functools\n\nLOADS = []\n\n@functools.cache\ndef model():\n    LOADS.append(1)\n    return len(LOADS)\n\n"
        "@functools.lru_cache(maxsize=4, typed=True)\ndef scaled(x):\n    return 10 * x\n\n"
        "def body(x):\n    return model(), scaled(x), scaled.cache_parameters()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
