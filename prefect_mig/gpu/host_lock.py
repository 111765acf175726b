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

Where the lock files live (`lock_dirs`): beside the simulated GPUs' state (``<state dir>/gpu-locks``,
private) for the simulated backend, whose GPUs are those of one state dir. For real GPUs
``PREFECT_MIG_GPU_LOCK_DIR`` when set; else a root process (real MIG changes need root) locks in
``/run/prefect-mig/gpu-locks``, which only root can write and whose files only root can open, so no
other user can hold a GPU's lock first and keep the agent from starting; a process of another user
(which cannot carve real GPUs, but would publish and grant their slices) refuses while a root
process holds a GPU's lock there (read from ``/proc/locks``, which needs no access to the file),
and locks among such users in ``/tmp/prefect-mig-gpu-locks`` (sticky, as /tmp). A root process does
not look there: any user may hold a file there, and a root agent must not wait for them. Only
processes sharing ``/run`` and ``/tmp`` see these (not a container with a /tmp of its own, nor a
systemd unit with PrivateTmp): there, set ``PREFECT_MIG_GPU_LOCK_DIR`` to a directory they all share.

A lock file is opened without following a symbolic link, must be a plain file with one name, and
this process writes who it is only into a file it owns; a shared directory must belong to root or
to this user and be sticky if others may write it. Anything else is refused (`GpuLockUntrusted`,
naming the path and its owner): another user could otherwise make a root agent truncate a file of
its choosing, or unlink a held lock file so that a second process locks a new one.

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

import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from prefect_mig.state_dir import private_dir

RUN_DIR = Path("/run/prefect-mig/gpu-locks")
FALLBACK_DIR = Path("/tmp/prefect-mig-gpu-locks")  # not TMPDIR: each user may set their own
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never a symlink's target; a FIFO must not block the open

Mode = Literal["shared", "private", "root"]


class LockDirs(NamedTuple):
    """Where a process locks its GPUs (`lock`, all of the same `mode`) and where it only looks
    (`watch`: root's lock files, which it may not open, but must not find held)."""

    lock: list[Path]
    mode: Mode
    watch: list[Path]


def lock_dirs(backend, gpu_lock_dir: str | os.PathLike | None = None, *, root_dir: Path = RUN_DIR,
              shared_dir: Path = FALLBACK_DIR, euid: int | None = None) -> LockDirs:
    """The directories of the GPU lock files for `backend`'s GPUs (see the module docstring): the
    simulated GPUs' state dir; for real GPUs `gpu_lock_dir` (``PREFECT_MIG_GPU_LOCK_DIR``), else
    `root_dir` for root (`euid` 0, default this process's), else `shared_dir`, watching `root_dir`."""
    from prefect_mig.gpu.simulated_nvml import SimulatedNvml

    if isinstance(backend.nvml, SimulatedNvml):
        return LockDirs([backend.nvml.state_dir / "gpu-locks"], "private", [])
    if gpu_lock_dir is not None:
        return LockDirs([Path(gpu_lock_dir)], "shared", [])
    if (os.geteuid() if euid is None else euid) == 0:
        return LockDirs([Path(root_dir)], "root", [])
    return LockDirs([Path(shared_dir)], "shared", [Path(root_dir)])


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
        mode: ``shared``: the directories are every user's (created sticky and world-writable, as
            /tmp); ``private``: their owner's alone (0700, files 0600, as everything under a state
            dir is); ``root``: root's alone (0755, files 0600: nobody else may open, so hold, one).
        watch: directories of root's lock files (`LockDirs.watch`): refused while one of `gpus` is
            held there, never locked.

    Raises (on entry):
        GpuHeld: another live process holds one of them; none is held then.
        GpuLockUntrusted: a directory or lock file another user could tamper with; none is held.
    """

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike], gpus: Sequence[str], *,
                 what: str, about: dict | None = None, mode: Mode = "shared",
                 watch: Sequence[str | os.PathLike] = ()):
        many = not isinstance(directories, str | os.PathLike)
        self.mode = mode
        self.directories = [Path(d) for d in directories] if many else [Path(directories)]
        self.watch = [Path(d) for d in watch]
        self.gpus = sorted(set(gpus))
        self.what = what
        self.about = dict(about or {})
        self._held: list[int] = []
        self.held = False

    @classmethod
    def for_backend(cls, backend, *, what: str, about: dict | None = None,
                    gpu_lock_dir: str | os.PathLike | None = None) -> GpuLocks:
        """Locks (not yet held) on every GPU `backend` sees, in its `lock_dirs`."""
        where = lock_dirs(backend, gpu_lock_dir)
        return cls(where.lock, [g.uuid for g in backend.gpus()], what=what, about=about, mode=where.mode,
                   watch=where.watch)

    def __enter__(self) -> GpuLocks:
        me = json.dumps({"pid": os.getpid(), "what": self.what, **self.about}, sort_keys=True).encode()
        try:
            for directory in self.watch:
                for gpu in self.gpus:
                    self._refuse_if_held(_lock_path(directory, gpu), gpu)
            for directory in self.directories:
                if self.mode == "private":
                    private_dir(directory)
                elif self.mode == "root":
                    _root_dir(directory)
                else:
                    _shared_dir(directory)
                for gpu in self.gpus:
                    self._lock(_lock_path(directory, gpu), gpu, me)
        except BaseException:
            self._release()
            raise
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _lock(self, path: Path, gpu: str, me: bytes) -> None:
        from prefect_mig.errors import GpuHeld

        fd = _open_lock_file(path, 0o644 if self.mode == "shared" else 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found = os.fstat(fd)
            os.close(fd)
            raise GpuHeld(gpu=gpu, path=str(path), **_holder(path, found)) from None
        except BaseException:
            os.close(fd)
            raise
        self._held.append(fd)
        owner = os.fstat(fd).st_uid
        if self.mode == "root" and owner != os.geteuid():  # left by an older version, whose /run dir others could write
            raise _untrusted(path, "a lock file of another user in root's lock dir", owner)
        if owner != os.geteuid():
            return  # another user's file: not ours to write (the next refusal finds the pid in /proc/locks)
        try:
            if self.mode == "root":
                os.fchmod(fd, 0o600)  # made readable by an older version: a readable file is one anybody can flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
        except OSError:
            pass  # the refusal of the next process then names the pid from /proc/locks alone

    def _refuse_if_held(self, path: Path, gpu: str) -> None:
        from prefect_mig.errors import GpuHeld

        try:
            found = os.lstat(path)
        except OSError:
            return  # no root process ever locked this GPU (or this user may not look)
        if stat.S_ISREG(found.st_mode) and _lock_holders(found):
            raise GpuHeld(gpu=gpu, path=str(path), **_holder(path, found))

    def _release(self) -> None:
        self.held = False
        while self._held:
            os.close(self._held.pop())  # closing the last descriptor drops the lock


def _lock_path(directory: Path, gpu: str) -> Path:
    return directory / f"{_UNSAFE.sub('_', gpu)}.lock"


def _owner(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _untrusted(path: Path, why: str, uid: int):
    from prefect_mig.errors import GpuLockUntrusted

    return GpuLockUntrusted(path=str(path), why=why, owner=_owner(uid))


def _open_lock_file(path: Path, perm: int) -> int:
    """A descriptor of the plain file `path` (made with `perm` if missing), read-write where this
    user may, else read-only (flock needs no write access); never a symlink's target, a device, a
    FIFO or a file with another name elsewhere."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN, perm)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | _OPEN)  # another user's file
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _untrusted(path, "a symbolic link", os.lstat(path).st_uid) from None
        raise
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        os.close(fd)
        why = "not a plain file" if not stat.S_ISREG(found.st_mode) else f"a file with {found.st_nlink} names (hard links)"
        raise _untrusted(path, why, found.st_uid)
    return fd


def _root_dir(path: Path) -> None:
    """Create `path` (and its parents) as root's (0755); an existing one must be root's, and is made
    writable by nobody else (an older version made it 1777)."""
    if not path.exists():
        for each in reversed([path, *path.parents]):
            if each.exists():
                continue
            try:
                each.mkdir(mode=0o755)
            except FileExistsError:
                continue
            each.chmod(0o755)
    found = os.lstat(path)
    if stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid() and found.st_mode & 0o022:
        path.chmod(0o755)
    _refuse_unless_safe(path, owners=(0, os.geteuid()), others_may_write=False)


def _shared_dir(path: Path) -> None:
    """Create `path` for every user of the host (sticky, as /tmp: one's lock file is not another's to
    remove); an existing one must be root's or this user's, and sticky if others may write it."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            os.chmod(path, 0o1777)
        except FileExistsError:
            pass
    _refuse_unless_safe(path, owners=(0, os.geteuid()), others_may_write=True)


def _refuse_unless_safe(path: Path, *, owners: tuple[int, ...], others_may_write: bool) -> None:
    found = os.lstat(path)
    if stat.S_ISLNK(found.st_mode):
        raise _untrusted(path, "a symbolic link, not a directory", found.st_uid)
    if found.st_uid not in owners:
        raise _untrusted(path, "a directory of another user, who could replace its lock files", found.st_uid)
    writable_by_others = found.st_mode & 0o022
    if writable_by_others and not others_may_write:
        raise _untrusted(path, f"a directory others may write (mode {found.st_mode & 0o7777:o})", found.st_uid)
    if writable_by_others and not found.st_mode & stat.S_ISVTX:
        raise _untrusted(path, f"a directory others may write without the sticky bit (mode {found.st_mode & 0o7777:o}), "
                               "so any user could remove a held lock file", found.st_uid)


def _lock_holders(found: os.stat_result) -> list[int]:
    """The pids /proc/locks shows holding an flock on the file `found` (any user's file: reading it
    needs no access to the file)."""
    inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146327 0 EOF"; "1: -> FLOCK ..." waits
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            holders.append(int(fields[4]))
    return holders


def _holder(path: Path, found: os.stat_result) -> dict:
    """Who holds `path`: what it wrote there, when /proc/locks agrees that its pid holds it (it writes
    just after it locked, so the file is read again for a moment), else the pid /proc/locks shows
    and that process's command and user, so a file another user wrote cannot name someone else."""
    holders = _lock_holders(found)
    for _ in range(20):
        try:
            wrote = json.loads(path.read_bytes() or b"null")
        except PermissionError:
            break  # root's lock file: /proc/locks is all this user may know
        except (OSError, ValueError):
            wrote = None
        if isinstance(wrote, dict) and (not holders or wrote.get("pid") in holders):
            return {"pid": wrote.get("pid"), "what": str(wrote.get("what", "a process")),
                    "about": {k: v for k, v in wrote.items() if k not in ("pid", "what")}}
        time.sleep(0.05)
    pid = next((p for p in holders if p), None)
    if pid is None:
        return {"pid": None, "what": "a process", "about": {}}
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        user = _owner(os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        command, user = "", None
    return {"pid": pid, "what": f"`{command[:120]}`" if command else "a process", "about": {"user": user}}
