"""One process per GPU of a host: every node agent (`NodeAgent.serving`, so `prefect-mig agent`, a
local cluster's agents and a library user's own) and the demo hold an flock per GPU, by UUID, for as
long as they serve it.

The node claim in Redis keeps two agents of one cluster off one GPU, but two clusters (another
namespace or another Redis: `prefect-mig demo` beside a standalone agent, two agents configured
apart) serving the same GPUs of one host would each carve them, and a re-carve of one destroys an
idle slice the other just leased. A lock file per GPU in a directory every process of the host sees
catches that: the second process refuses to start (`GpuHeld`, naming the GPU, the holder's pid and
how to stop it). flock locks die with their process, so a crash leaves nothing to clean up; the
files stay (removing one would race with a process locking it).

Where the lock files live (`lock_dirs`): beside the simulated GPUs' state (``<state dir>/gpu-locks``)
for the simulated backend, whose GPUs are those of one state dir; for real GPUs
``PREFECT_MIG_GPU_LOCK_DIR`` when set, else ``/run/prefect-mig/gpu-locks`` when it can be created
and written and ``/tmp/prefect-mig-gpu-locks`` (so a user's process, which cannot write /run, meets
a root agent's locks there). Only processes sharing ``/tmp`` see the latter (not a container with a
/tmp of its own, nor a systemd unit with PrivateTmp): there, set ``PREFECT_MIG_GPU_LOCK_DIR`` to a
directory they all share.

Examples:
    ```python
    import tempfile

    from prefect_mig.errors import GpuHeld
    from prefect_mig.gpu.host_lock import GpuLocks

    where = tempfile.mkdtemp()
    with GpuLocks(where, ["GPU-1", "GPU-2"], what="prefect-mig agent"):
        try:
            with GpuLocks(where, ["GPU-2"], what="prefect-mig demo"):
                pass
        except GpuHeld as held:
            assert held.gpu == "GPU-2" and held.what == "prefect-mig agent"
    with GpuLocks(where, ["GPU-2"], what="prefect-mig demo"):  # free once the first block ended
        pass
    ```
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from prefect_mig.state_dir import private_dir

RUN_DIR = Path("/run/prefect-mig/gpu-locks")
FALLBACK_DIR = Path("/tmp/prefect-mig-gpu-locks")  # not TMPDIR: each user may set their own
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def lock_dirs(backend, gpu_lock_dir: str | os.PathLike | None = None, *,
              candidates: Sequence[Path] = (RUN_DIR, FALLBACK_DIR)) -> list[Path]:
    """The directories of the GPU lock files for `backend`'s GPUs (see the module docstring): the
    simulated GPUs' state dir; for real GPUs `gpu_lock_dir` (``PREFECT_MIG_GPU_LOCK_DIR``), else each of
    `candidates` that can be made and written (a root agent locks in both /run and /tmp, so a user's
    process, which cannot write /run, still meets its locks in /tmp), at least the last."""
    from prefect_mig.gpu.simulated_nvml import SimulatedNvml

    if isinstance(backend.nvml, SimulatedNvml):
        return [backend.nvml.state_dir / "gpu-locks"]
    if gpu_lock_dir is not None:
        return [Path(gpu_lock_dir)]
    usable = []
    for candidate in candidates:
        try:
            _shared_dir(candidate)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            usable.append(Path(candidate))
    return usable or [Path(candidates[-1])]


def _shared_dir(path: Path) -> None:
    """Create `path` for every user of the host (sticky, as /tmp: one's lock file is not another's to
    remove); an existing one is left as it is."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        return
    os.chmod(path, 0o1777)


def hold_gpus(backend, settings, what: str, *, node: str) -> GpuLocks:
    """`GpuLocks` (not yet held) on every GPU `backend` sees, in `lock_dirs`, saying what holds them
    (`what`, e.g. ``prefect-mig agent``, with the settings' namespace and state dir, and `node`)."""
    about = {"namespace": settings.namespace, "node": node, "state_dir": str(settings.state_dir)}
    return GpuLocks.for_backend(backend, what=what, about=about, gpu_lock_dir=settings.gpu_lock_dir)


class GpuLocks:
    """Hold an flock on each of `gpus` (UUIDs) in each of `directories` while the block runs, all
    or none.

    Args:
        directories: where the lock files are (`lock_dirs`; one path or several); created if missing.
        gpus: the UUIDs of the GPUs this process serves.
        what: what this process is, as the refusal names it (``prefect-mig agent``).
        about: more of what it is (namespace, node, state dir), shown to the process refused.
        private: the directories and lock files are their owner's alone (0700 and 0600, as
            everything under a state dir is), not shared by every user of the host.

    Raises (on entry):
        GpuHeld: another live process holds one of them; none is held then.
    """

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike], gpus: Sequence[str], *,
                 what: str, about: dict | None = None, private: bool = False):
        many = not isinstance(directories, str | os.PathLike)
        self.private = private
        self.directories = [Path(d) for d in directories] if many else [Path(directories)]
        self.gpus = sorted(set(gpus))
        self.what = what
        self.about = dict(about or {})
        self._held: list[int] = []
        self.held = False

    @classmethod
    def for_backend(cls, backend, *, what: str, about: dict | None = None,
                    gpu_lock_dir: str | os.PathLike | None = None) -> GpuLocks:
        """Locks (not yet held) on every GPU `backend` sees, in its `lock_dirs`."""
        from prefect_mig.gpu.simulated_nvml import SimulatedNvml

        return cls(lock_dirs(backend, gpu_lock_dir), [g.uuid for g in backend.gpus()], what=what, about=about,
                   private=isinstance(backend.nvml, SimulatedNvml))  # simulated GPUs: one user's state dir

    def __enter__(self) -> GpuLocks:
        me = json.dumps({"pid": os.getpid(), "what": self.what, **self.about}, sort_keys=True).encode()
        try:
            for directory in self.directories:
                if self.private:
                    private_dir(directory)
                else:
                    _shared_dir(directory)
                for gpu in self.gpus:
                    self._lock(directory / f"{_UNSAFE.sub('_', gpu)}.lock", gpu, me)
        except BaseException:
            self._release()
            raise
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _lock(self, path: Path, gpu: str, me: bytes) -> None:
        from prefect_mig.errors import GpuHeld

        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600 if self.private else 0o644)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)  # another user's file: flock needs no write access
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GpuHeld(gpu=gpu, path=str(path), **_holder(path)) from None
        except BaseException:
            os.close(fd)
            raise
        self._held.append(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
        except OSError:
            pass  # read-only: the refusal of the next process names no pid

    def _release(self) -> None:
        self.held = False
        while self._held:
            os.close(self._held.pop())  # closing the last descriptor drops the lock


def _holder(path: Path) -> dict:
    """What the holder of `path` wrote there; it writes just after it locked, so an empty file is
    read again for a moment."""
    for _ in range(20):
        try:
            found = json.loads(path.read_bytes() or b"null")
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict):
            return {"pid": found.get("pid"), "what": str(found.get("what", "a process")),
                    "about": {k: v for k, v in found.items() if k not in ("pid", "what")}}
        time.sleep(0.05)
    return {"pid": None, "what": "a process", "about": {}}
