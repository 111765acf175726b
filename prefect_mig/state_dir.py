"""The project's state dir (``PREFECT_MIG_STATE_DIR``, ``~/.prefect-mig``) is its owner's alone.

It holds the embedded Redis's password and data, the local cluster's log and the simulated GPUs'
state, so whatever the project creates there is 0700 (directories) or 0600 (files). A directory
that already exists is left as it is, except the ones the project owns outright (``private=True``),
so pointing ``PREFECT_MIG_STATE_DIR`` at a shared folder never changes that folder's mode.

Examples:
    ```python
    import stat, tempfile
    from pathlib import Path
    from prefect_mig.state_dir import private_dir, write_private

    root = Path(tempfile.mkdtemp())
    home = private_dir(root / "state" / "local")
    write_private(home / "note.json", "{}")
    assert stat.S_IMODE((root / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "note.json").stat().st_mode) == 0o600
    ```
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def private_dir(path: Path | str, *, private: bool = True) -> Path:
    """Create `path` and any missing parents as 0700; make `path` itself 0700 when `private`."""
    path = Path(path)
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for each in reversed(missing):
        try:
            each.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile
        each.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened: be exact
    if private and path not in missing:
        path.chmod(0o700)
    return path


def write_private(path: Path | str, text: str) -> None:
    """Write `text` to a file only its owner may read (created 0600, never readable in between)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def open_private(path: Path | str, mode: str = "ab"):
    """Open `path` for appending (or `mode`), creating it 0600."""
    flags = (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


@contextmanager
def private_files() -> Iterator[None]:
    """Within it, whatever this process and the processes it starts create is its owner's alone
    (umask 077): the one way to reach files a child process writes, such as a database's."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
