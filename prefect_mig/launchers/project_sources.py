"""Sources of the user's project modules that a body imports but the flow's process never loaded.

Modules the flow's process has loaded travel with the call by value (`docker._pickle_call`); one
that a body (or a function of the project it calls) imports only when it runs, such as a sibling
``helpers.py`` imported inside the task, is not loaded there, and the image has no copy of it. Its
source goes with the call instead, found on the flow's ``sys.path`` without importing it (importing
runs its code, in the wrong process), and the container's runtime imports it from that source when
the body asks (``runtime_entry._ProjectSources``), after anything the image itself has.

Only Python source files of the project go (not installed: not under ``site-packages``,
``dist-packages`` or the standard library, not prefect-mig), a package with its ``.py`` files,
and, transitively, the project modules those import; at most `MAX_BYTES` in all.

Examples:
    ```python
    from prefect_mig.launchers.project_sources import unloaded_project_sources

    def body():
        import json  # installed with Python: never sent
        return json.dumps(1)

    assert unloaded_project_sources(body) == {}
    ```
"""

from __future__ import annotations

import ast
import dis
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator

from prefect_mig.launchers.runtime import runtime_packages

#: the most source bytes one call carries; a project larger than that is left to the image
MAX_BYTES = 4 * 1024 * 1024

_CACHE: dict[tuple, dict[str, tuple[str, str, bool]]] = {}  # (code, len(sys.modules)) -> sources
_FILE_IMPORTS: dict[tuple[str, int], frozenset[str]] = {}  # (file, mtime_ns) -> top-level names it imports


def is_user_file(name: str, origin: str) -> bool:
    """Python source of the user's project: not installed and not prefect-mig's (or its runtime's)."""
    installed = "site-packages" in origin or "dist-packages" in origin or origin.startswith(sys.base_prefix)
    ours = name.split(".")[0] in {"prefect_mig", *(m.__name__ for m in runtime_packages())}
    return origin.endswith(".py") and not installed and not ours


def unloaded_project_sources(fn: Callable, loaded: Iterable[types.ModuleType] = ()) -> dict[str, tuple[str, str, bool]]:
    """``{module name: (file, source, is_package)}`` for the project modules that `fn`, or a module
    of `loaded` (the project's modules this process has, whose functions a body may call), imports
    anywhere and this process has not loaded; empty when there are none."""
    code = _code_of(fn)
    loaded = list(loaded)
    key = (code, len(sys.modules))
    known = _CACHE.get(key)
    if known is not None:
        return known
    names = set(_imported_by_code(code)) if code is not None else set()
    main = sys.modules.get("__main__")
    for module in [*loaded, main]:
        origin = getattr(module, "__file__", None) or ""
        if origin.endswith(".py"):
            names |= _imported_by_file(origin)
    sources: dict[str, tuple[str, str, bool]] = {}
    size, pending, seen = 0, sorted(names), set()
    while pending:
        name = pending.pop()
        if name in seen or name in sys.modules:
            continue
        seen.add(name)
        found = _project_files(name)
        if found is None:
            continue
        more = sum(len(source) for _, (_, source, _) in found.items())
        if size + more > MAX_BYTES:
            continue
        size += more
        sources.update(found)
        for path, _, _ in found.values():
            pending += sorted(_imported_by_file(path) - seen)
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = sources
    return sources


def _code_of(fn: Callable) -> types.CodeType | None:
    fn = getattr(fn, "__func__", fn)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return getattr(fn, "__code__", None)


def _imported_by_code(code: types.CodeType) -> Iterator[str]:
    """Top-level names of the absolute imports in `code` and the code nested in it."""
    for instruction in dis.get_instructions(code):
        if instruction.opname == "IMPORT_NAME" and instruction.argval:
            yield instruction.argval.split(".")[0]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _imported_by_code(const)


def _imported_by_file(path: str) -> frozenset[str]:
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return frozenset()
    names = _FILE_IMPORTS.get(key)
    if names is None:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (OSError, SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
        names = _FILE_IMPORTS[key] = frozenset(found)
    return names


def _project_files(name: str) -> dict[str, tuple[str, str, bool]] | None:
    """The sources of top-level module `name` as this process's ``sys.path`` finds it (without
    importing it), when it is the user's: a module, or a package with every module under it."""
    try:
        spec = importlib.machinery.PathFinder.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) or ""
    if spec is None or not is_user_file(name, origin):
        return None
    if not spec.submodule_search_locations:
        source = _read(origin)
        return None if source is None else {name: (origin, source, False)}
    root = os.path.dirname(origin)
    files: dict[str, tuple[str, str, bool]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d.isidentifier())
        for file in sorted(names):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            parts = [name, *os.path.relpath(path, root)[: -len(".py")].split(os.sep)]
            package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if package else parts)
            source = _read(path)
            if source is not None:
                files[module] = (path, source, package)
    return files


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None
