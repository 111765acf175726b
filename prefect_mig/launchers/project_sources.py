"""Sources of the user's project modules that a body imports when it runs.

Functions of the modules the flow's process has loaded travel with the call by value
(`docker._pickle_call`), but no module of the project is importable in the container: a body (or a
function of the project it calls) that runs ``import helpers`` or ``from myproj.io import load``
there found none, whether or not the flow's process had loaded it. Those modules' sources go with
the call instead, found on the flow's ``sys.path`` without importing them (importing runs their
code, in the wrong process), and the container's runtime imports them from that source when the
body asks (``runtime_entry._ProjectSources``), after anything the image itself has.

What goes: the modules imported by the body's code and by the code of the project's functions it
may call (the functions, classes and modules of the project its code names, and theirs in turn: a
helper's lazy import), and, transitively, every module a shipped module imports; of those, only
Python source files of the project (not installed: not under ``site-packages``, ``dist-packages``
or the standard library, not prefect-mig), a package with all its ``.py`` files; at most
`MAX_BYTES` in all.

Examples:
    ```python
    from prefect_mig.launchers.project_sources import project_sources

    def body():
        import json  # installed with Python: never sent
        return json.dumps(1)

    assert project_sources(body) == {}
    ```
"""

from __future__ import annotations

import ast
import dis
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from prefect_mig.launchers.runtime import runtime_packages

#: the most source bytes one call carries; a project larger than that is left to the image
MAX_BYTES = 4 * 1024 * 1024

_CACHE: dict[tuple, dict[str, tuple[str, str, bool]]] = {}  # (code, len(sys.modules)) -> sources
_FILE_IMPORTS: dict[tuple[str, int], frozenset[str]] = {}  # (file, mtime_ns) -> top-level names it imports


#: the standard library's folder (not ``sys.base_prefix``: a project in /usr/src/app lies under /usr)
_STDLIB = os.path.dirname(os.__file__) + os.sep


def is_user_file(name: str, origin: str) -> bool:
    """Python source of the user's project: not installed and not prefect-mig's (or its runtime's)."""
    installed = "site-packages" in origin or "dist-packages" in origin or origin.startswith(_STDLIB)
    ours = name.split(".")[0] in {"prefect_mig", *(m.__name__ for m in runtime_packages())}
    return origin.endswith(".py") and not installed and not ours


def project_sources(fn: Callable) -> dict[str, tuple[str, str, bool]]:
    """``{module name: (file, source, is_package)}`` for the project modules that `fn`, or a function
    of the project it may call, imports, with what those import in turn; empty when none."""
    key = (_code_of(fn), len(sys.modules))
    known = _CACHE.get(key)
    if known is not None:
        return known
    names: set[str] = set()
    for function, _ in reachable_functions(fn):
        names.update(_imported_by_code(function.__code__))
    sources: dict[str, tuple[str, str, bool]] = {}
    size, pending, seen = 0, sorted(names), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        present = sys.modules.get(name)
        if present is not None and not is_user_file(name, getattr(present, "__file__", None) or ""):
            continue
        found = _project_files(name)
        if found is None:
            continue
        more = sum(len(source) for _, source, _ in found.values())
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


def _unwrapped(fn: Any) -> Any:
    fn = getattr(fn, "__func__", fn)
    for _ in range(16):  # bounded: a mock makes up a new __wrapped__ at each look
        if isinstance(fn, type) or not hasattr(fn, "__wrapped__"):
            break
        fn = fn.__wrapped__
    return fn


def _code_of(fn: Any) -> types.CodeType | None:
    return getattr(_unwrapped(fn), "__code__", None)


def _is_project(value: Any) -> bool:
    """Is `value` (a function, class or module) of the user's project?"""
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    module = sys.modules.get(name or "")
    if module is None or module.__name__ == "__main__":
        return True  # the flow's script, or code made on the fly: it travels by value
    return is_user_file(module.__name__, getattr(module, "__file__", None) or "")


def reachable_functions(fn: Any, limit: int = 2000) -> Iterator[tuple[Any, list[tuple[str, Any]]]]:
    """`fn` and the project's functions it may call (those its globals and closure name, the methods
    of the project's classes it names, the functions of the project's modules it names whose names
    its code uses, ``helpers.load``, and so on), each with the ``(name, value)`` of the globals and
    closure values its code reads (at most `limit` functions)."""
    pending, seen = [fn], set()
    while pending and len(seen) < limit:
        current = _unwrapped(pending.pop())
        if isinstance(current, type):
            if current not in seen:
                seen.add(current)
                pending += [member for member in vars(current).values() if callable(_unwrapped(member))]
            continue
        code = getattr(current, "__code__", None)
        if not isinstance(code, types.CodeType) or code in seen:
            continue
        seen.add(code)
        used = set(_names_of(code))
        scope = getattr(current, "__globals__", None) or {}
        values = [(name, scope[name]) for name in sorted(used) if name in scope]
        for name, cell in zip(code.co_freevars, getattr(current, "__closure__", None) or ()):
            try:
                values.append((name, cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        yield current, values
        for _, value in values:
            if isinstance(value, types.ModuleType):
                if _is_project(value):
                    pending += [getattr(value, name) for name in used if callable(getattr(value, name, None))]
            elif callable(value) and _is_project(_unwrapped(value)):
                pending.append(value)


def is_project_code(value: Any) -> bool:
    """A module, or a function or class of the project, whose code `reachable_functions` walks into."""
    return isinstance(value, types.ModuleType) or (callable(value) and _is_project(_unwrapped(value)))


def _names_of(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names_of(const)


def _imported_by_code(code: types.CodeType) -> Iterator[str]:
    """Top-level names of the absolute imports in `code` and the code nested in it."""
    for instruction in dis.get_instructions(code):
        if instruction.opname == "IMPORT_NAME" and instruction.argval:
            yield instruction.argval.split(".")[0]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _imported_by_code(const)


def _imported_by_file(path: str) -> frozenset[str]:
    """Top-level names of the absolute imports in the file at `path`."""
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
