"""Run one function call in a Docker container bound to one MIG slice.

Only the function body runs in the container (design decision 1). The call ``(fn, args, kwargs)``
is cloudpickled; a small runtime (``runtime_entry.py`` and the host's cloudpickle) and the payload
go in with ``put_archive`` and the outcome comes back with ``get_archive``, so a remote engine
(``DOCKER_HOST``, one per GPU node) works like the local one: nothing is bind-mounted from the
client's disk. The container is removed on every path.

Binding: with real GPUs a ``DeviceRequest(driver="nvidia", device_ids=[MIG UUID])`` plus
``NVIDIA_VISIBLE_DEVICES``; without (simulated NVML) the same environment
(``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` = the MIG UUID) and no device request.

Examples:
    ```python
    from prefect_mig.launchers.docker import ContainerSettings, DockerLauncher

    def body(x):
        import os
        return x * 2, os.environ["CUDA_VISIBLE_DEVICES"]

    launcher = DockerLauncher(ContainerSettings(image="prefect-mig-python:bookworm"))
    assert launcher.run(body, (21,), {}, mig_uuid="MIG-demo") == (42, "MIG-demo")
    ```
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import os
import re
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import cloudpickle
import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, Mount
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_mig.errors import (
    ConfigError,
    ContainerFailed,
    ContainerStopped,
    DockerUnavailable,
    ImageNotFound,
    ImagePythonMismatch,
    LaunchError,
)
from prefect_mig.launchers.engines import DockerTls, engine_client
from prefect_mig.launchers.outcome import load_outcome, value_of
from prefect_mig.launchers.project_sources import is_project_code, is_user_file, project_sources, reachable_functions
from prefect_mig.launchers.runtime import probe_python, remove_launched, runtime_files, runtime_packages

log = logging.getLogger("prefect_mig.launchers")

HOME = "/opt/prefect-mig"
LABEL_PREFIX = "prefect-mig."
_VERSIONS: dict[tuple[str, str], tuple[int, int]] = {}  # (engine, image id) -> python (major, minor)


def cluster_labels(*, cluster_id: str, namespace: str, node: str) -> dict[str, str]:
    """The labels (without the ``prefect-mig.`` prefix) that tie a task container to its cluster
    (the id kept in Redis plus the namespace) and to the node whose slice it uses."""
    return {"cluster": cluster_id, "namespace": namespace, "node": node}


def _not_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise ContainerStopped("the task was stopped before its container started.")


def start_confirmed(container, stop: threading.Event | None, confirm: Callable[[], object] | None) -> None:
    """Start a created task container unless `stop` is set or `confirm` raises.

    `confirm` proves the holder's right to the slice at the last moment: the runner passes its
    lease's renewal. The container already exists (with its lease labels) when it runs, so a node
    agent that settles an expired lease's slice either saw this container (and fences it) or
    looked before it existed, after the lease had expired, and then the renewal fails and the
    container never starts. Without it, a holder delayed between its grant and the start (a big
    argument to pickle, Redis or the engine slow to answer) could start on a slice already handed on.
    """
    _not_stopped(stop)
    if confirm is not None:
        confirm()
        _not_stopped(stop)
    container.start()


def task_containers(
    client: docker.DockerClient,
    *,
    cluster_id: str | None,
    namespace: str,
    node: str | None = None,
    running_only: bool = False,
) -> list:
    """The task containers of one cluster (and of one of its nodes) on `client`'s engine.

    This is the one way prefect-mig code and tests find task containers: an engine may be shared by
    several clusters, and each touches only its own. Containers that vanish while being listed are
    left out. ``cluster_id=None`` lists those of every cluster id in `namespace`: for telling which
    slices are in use, never for choosing containers to remove.

    Examples:
        ```python
        import docker
        from prefect_mig.launchers.docker import task_containers

        assert task_containers(docker.from_env(), cluster_id="nobody", namespace="none") == []
        ```
    """
    wanted = {"namespace": namespace} | ({"cluster": cluster_id} if cluster_id is not None else {}) | ({"node": node} if node else {})
    filters: dict[str, Any] = {"label": [f"{LABEL_PREFIX}{k}={v}" for k, v in wanted.items()]}
    if running_only:
        filters["status"] = "running"
    return client.containers.list(all=not running_only, filters=filters, ignore_removed=True)


def slice_bound_options(s: ContainerSettings, mig_uuid: str) -> dict[str, Any]:
    """``containers.create`` options of `s` that any container on a slice gets (limits, volumes,
    the GPU device request); shared by task containers and the mig-docker worker's flow runs."""
    create: dict[str, Any] = {}
    if s.cpus:
        create["nano_cpus"] = int(s.cpus * 1e9)
    if s.mem_limit:
        create["mem_limit"] = s.mem_limit
    if s.volumes:
        create["volumes"] = list(s.volumes)
    if s.gpu_runtime == "nvidia":
        create["device_requests"] = [DeviceRequest(driver="nvidia", device_ids=[mig_uuid], capabilities=[["gpu"]])]
    return create


#: a volume as the engine takes it: a host path or volume name, the absolute path in the container, a mode
VOLUME_SPEC = re.compile(r"[^:]+:/[^:]*(:[A-Za-z,]+)?")


class ContainerSettings(BaseModel):
    """How task containers are made (mirrored by the MigCluster block's fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(default="prefect-mig-python:bookworm", min_length=1, description="Image with python3 of the flow's minor version.")
    docker_host: str | None = Field(default=None, description="Docker engine URL; None = DOCKER_HOST or the local socket.")
    docker_tls: DockerTls | None = Field(default=None, description="Client certificates for a tcp:// engine with --tlsverify.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    volumes: list[str] = Field(default_factory=list, description="Volumes as 'host_or_name:/container/path[:ro|rw]'.")
    network: str | None = Field(default=None, description="Docker network; None = networking off.")
    cpus: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False, description="CPU limit (cores).")
    mem_limit: str | None = Field(default=None, pattern=r"^\d+[bkmgBKMG]?$", description="Memory limit, e.g. '4g'.")
    gpu_runtime: Literal["nvidia", "none"] = Field(
        default="none", description="'nvidia' adds a DeviceRequest for the MIG UUID (real GPUs)."
    )
    # hardening: on by default; each can be loosened for a body that needs it
    read_only_root: bool = Field(
        default=True,
        description="Read-only root file system; /tmp is a tmpfs and the runtime's dir a private volume.",
    )
    tmp_size: str = Field(default="1g", pattern=r"^\d+[kmgKMG]?$", description="Size of the /tmp tmpfs.")
    no_new_privileges: bool = Field(default=True, description="no-new-privileges: setuid binaries gain nothing.")
    cap_add: list[str] = Field(
        default_factory=list, description="Capabilities kept; all others are dropped (e.g. ['CHOWN']); ['ALL'] = Docker's defaults."
    )
    pids_limit: int | None = Field(default=4096, ge=16, description="Most processes/threads in the container; None = no limit.")
    user: str | None = Field(default=None, description="Run as this 'uid[:gid]' (e.g. '65534:65534'); None = the image's user.")

    @field_validator("volumes")
    @classmethod
    def _volume_specs(cls, volumes: list[str]) -> list[str]:
        for spec in volumes:
            if not VOLUME_SPEC.fullmatch(spec):
                raise ValueError(f"{spec!r} is not 'host_or_name:/container/path[:ro|rw]'")
        return volumes

    @field_validator("network")
    @classmethod
    def _network_named(cls, network: str | None) -> str | None:
        if network is not None and not network.strip():
            raise ValueError("give a Docker network name, or None for networking off")
        return network


def _hardening(s: ContainerSettings) -> dict[str, Any]:
    """Container create arguments that confine the body (see the ContainerSettings fields)."""
    # the runtime is copied into HOME before start and its outcome read after exit, so HOME is an
    # anonymous volume (a tmpfs exists only while the container runs); removed with the container
    return {"mounts": [Mount(HOME, None, type="volume")], **confinement_options(s)}


def confinement_options(s: ContainerSettings) -> dict[str, Any]:
    """``containers.create`` options that confine any container on a slice (read-only root with a
    tmpfs /tmp, capabilities, no-new-privileges, pids, user); task containers and the mig-docker
    worker's flow-run containers share them."""
    create: dict[str, Any] = {
        "cap_drop": [] if s.cap_add == ["ALL"] else ["ALL"],
        "cap_add": [] if s.cap_add == ["ALL"] else list(s.cap_add),
    }
    if s.read_only_root:
        create["read_only"] = True
        create["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={s.tmp_size}"}
    if s.no_new_privileges:
        create["security_opt"] = ["no-new-privileges:true"]
    if s.pids_limit is not None:
        create["pids_limit"] = s.pids_limit
    if s.user is not None:
        create["user"] = s.user
    return create


#: the largest environment value a cold container gets as such: Linux refuses to exec a process
#: with one variable over 128 KiB (MAX_ARG_STRLEN), and with all of them over a quarter of its stack
EXEC_ENV_VALUE_MAX = 16 * 1024


def _exec_sized(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """`env` split into what the container's environment can hold and the larger values (a run
    context whose parameters are a big batch), which travel in the runtime archive as ``env.json``
    and which the entry script puts into its environment before anything else."""
    small = {k: v for k, v in env.items() if v is None or len(str(v)) <= EXEC_ENV_VALUE_MAX}
    return small, {k: str(v) for k, v in env.items() if k not in small}


def _runtime_archive(payload: bytes | None, env: dict[str, str] | None = None) -> bytes:
    """A tar of /opt/prefect-mig: the entry script, the host's cloudpickle, the payload (none for a
    warm container, whose calls come over stdin) and the environment values too large for the
    container's own (``env.json``, see `_exec_sized`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        home = tarfile.TarInfo("")  # HOME itself (its own volume), made writable for any --user
        home.type, home.mode, home.mtime = tarfile.DIRTYPE, 0o1777, int(time.time())
        tar.addfile(home)
        add_bytes("entry.py", (Path(__file__).parent / "runtime_entry.py").read_bytes())
        if payload is not None:
            add_bytes("payload.pkl", payload)
        if env:
            add_bytes("env.json", json.dumps(env).encode())
        for module in runtime_packages():
            package = Path(module.__file__).parent
            for path in sorted(package.rglob("*.py")):
                add_bytes(f"site/{module.__name__}/{path.relative_to(package)}", path.read_bytes())
        for name, data in runtime_files().items():
            add_bytes(name, data)
    return buf.getvalue()


_BY_VALUE_LOCK = threading.Lock()
_BY_VALUE_USERS: dict[str, int] = {}  # module name -> calls pickling it by value right now
_USER_CODE: dict[tuple[str, str], bool] = {}  # (module name, file) -> is it the user's own code


def _is_user_code(module: ModuleType) -> bool:
    """A module of the user's project: Python source that is not installed (site-packages,
    dist-packages, the standard library) and not prefect-mig itself (the container gets none of it)."""
    origin = getattr(module, "__file__", None) or ""
    key = (module.__name__, origin)
    known = _USER_CODE.get(key)
    if known is None:
        known = _USER_CODE[key] = is_user_file(module.__name__, origin)
    return known


_PROJECT_SEEN: list = [-1, []]  # [len(sys.modules) when last listed, the user's modules then]


def _project_modules() -> list[ModuleType]:
    """The user's own modules loaded in this process, listed again only when `sys.modules` grew or
    shrank (a scan costs milliseconds, too much for every warm call)."""
    count, modules = _PROJECT_SEEN
    if count != len(sys.modules):
        loaded = list(sys.modules.values())
        modules = [m for m in loaded if isinstance(m, ModuleType) and m.__name__ != "__main__" and _is_user_code(m)]
        _PROJECT_SEEN[:] = [len(loaded), modules]
    return modules


def _pickle_call(fn: Callable, args: tuple, kwargs: dict, side_values: dict[str, Any] | None = None) -> bytes:
    """Cloudpickle the call, and `side_values` each on its own beside it (bytes the container
    unpickles only when its runtime asks: a value the body never reads cannot fail its call); the user's own modules (not installed: the function's, and those it
    imports from, such as a sibling module with its helpers and exception types) travel by value,
    and those the body imports when it runs go as source too (``project_sources``, see
    `project_sources`), so the container needs no copy of the user's project. Should one of them hold something that
    cannot be pickled, the call goes with its function's module alone by value, as an image that
    has the project installed needs."""
    own = sys.modules.get(getattr(fn, "__module__", "") or "")
    own_only = [own] if own is not None and own.__name__ != "__main__" and _is_user_code(own) else []
    project = _project_modules()
    try:
        sources = project_sources(fn)
    except Exception:  # noqa: BLE001 - a look at the user's code must never fail a call that pickles
        sources = {}
    if sources:
        side_values = {**(side_values or {}), "project_sources": sources}
    try:
        return _pickle_with_by_value(fn, args, kwargs, side_values, project)
    except Exception:  # noqa: BLE001 - retried below; a call that cannot be pickled at all raises there
        if len(project) <= len(own_only):
            raise
    return _pickle_with_by_value(fn, args, kwargs, side_values, own_only)


def check_call_pickles(fn: Callable, args: tuple, kwargs: dict) -> None:
    """Raise `ConfigError` naming the argument (or the function) that cannot go to a container.

    A caller checks before it leases a slice, so that a call that can never be sent fails at once
    rather than after its wait. The bytes are dropped: a try waiting for a slice holds no copy."""
    try:
        _pickle_call(fn, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - named below; anything else is raised as it is
        name, value = _unpicklable_part(fn, args, kwargs)
        if name in (None, ""):
            found = _unpicklable_global(fn)
            if found is not None:
                glob, user, value = found
                raise ConfigError(
                    f"global {glob!r} ({_a_type(value)}) that {user} uses cannot be sent to the task's container: "
                    f"{type(exc).__name__}: {exc}. A body on a slice runs in another process, which gets its call and "
                    "the globals its code uses by pickle (cloudpickle): make it inside the function that uses it (a "
                    "`functools.cache` loader makes it once per process), or pass what it is made from (a path, a URL, "
                    "settings).",
                    field=glob, value=value,
                ) from exc
        if name is None:
            raise
        kind = type(value)
        where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        what = "the task's function" if name == "" else f"argument {name!r}"
        raise ConfigError(
            f"{what} of {getattr(fn, '__qualname__', repr(fn))} (a {where}{kind.__qualname__}) cannot be sent to the "
            f"task's container: {type(exc).__name__}: {exc}. A body on a slice runs in another process, which gets its "
            "call by pickle (cloudpickle): pass what the body needs to make it there instead (a path, a URL, settings).",
            field=name or "fn", value=value,
        ) from exc


def _a_type(value: Any) -> str:
    kind = type(value)
    return f"a {'' if kind.__module__ == 'builtins' else kind.__module__ + '.'}{kind.__qualname__}"


def _unpicklable_global(fn: Any) -> tuple[str, str, Any] | None:
    """(name, the function that reads it, value) of the first global or closure value that `fn`, or
    a function of the user's code it calls, reads and that does not pickle."""
    for function, values in reachable_functions(fn):
        for name, value in values:
            if is_project_code(value):
                continue  # a module, or code the walk goes into
            try:
                _dumps(value)
            except Exception:  # noqa: BLE001 - this is the one
                return name, getattr(function, "__qualname__", repr(function)), value
    return None


def _unpicklable_part(fn: Callable, args: tuple, kwargs: dict) -> tuple[str | None, Any]:
    """The name of the first argument that does not pickle on its own ("" for the function), and it."""
    try:
        named = list(inspect.signature(fn).bind_partial(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        named = [(f"#{i}", value) for i, value in enumerate(args)] + list(kwargs.items())
    for name, value in [*named, ("", fn)]:
        try:
            _dumps(value)
        except Exception:  # noqa: BLE001 - this is the one
            return name, value
    return None, None


def _pickle_with_by_value(fn: Callable, args: tuple, kwargs: dict, side_values: dict[str, Any] | None,
                          modules: list[ModuleType]) -> bytes:
    # counted: tasks pickled at once in several threads (a map) must not unregister a module under
    # each other (a ValueError, or a call pickled by reference the container lacks)
    with _BY_VALUE_LOCK:
        for module in modules:
            if not _BY_VALUE_USERS.get(module.__name__):
                cloudpickle.register_pickle_by_value(module)
            _BY_VALUE_USERS[module.__name__] = _BY_VALUE_USERS.get(module.__name__, 0) + 1
    try:
        call: tuple = (fn, tuple(args), dict(kwargs))
        if side_values:
            call += (_side_values(side_values),)
        return _dumps(call)
    finally:
        with _BY_VALUE_LOCK:
            for module in modules:
                _BY_VALUE_USERS[module.__name__] -= 1
                if not _BY_VALUE_USERS[module.__name__]:
                    del _BY_VALUE_USERS[module.__name__]
                    cloudpickle.unregister_pickle_by_value(module)


def _dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    _CallPickler(out, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return out.getvalue()


def _side_values(side_values: dict[str, Any]) -> dict[str, Any]:
    """Each of `side_values` pickled on its own. A side value must never fail the call it goes
    with: a dict whose values do not all pickle keeps those that do, and ``<name>_unsent`` names
    the others, with their type and why, for the runtime to raise when the body reads one
    (`runtime_shim.FlowParameters`); any other value that does not pickle goes as its ``repr``."""
    out: dict[str, Any] = {}
    for name, value in side_values.items():
        try:
            out[name] = _dumps(value)
            continue
        except Exception:  # noqa: BLE001 - retried value by value
            if not isinstance(value, dict):
                out[name] = _dumps(repr(value))
                continue
        kept, unsent = {}, {}
        for key, item in value.items():
            try:
                _dumps(item)
                kept[key] = item
            except Exception as exc:  # noqa: BLE001 - named for the body, which may never read it
                kind = type(item)
                where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
                unsent[key] = (f"{where}{kind.__qualname__}", f"{type(exc).__name__}: {exc}")
        out[name], out[f"{name}_unsent"] = _dumps(kept), unsent
    return out


class _CallPickler(cloudpickle.Pickler):
    """Cloudpickle, except that a class sent by value (the class of a task method's instance) takes
    its Prefect tasks along as the plain functions they run (`_plain_body`): the container may have
    no Prefect (and has no prefect-mig) to rebuild a ``prefect.Task`` with, and a body that calls
    another task method of its instance runs it inline, on its own slice. A complete pydantic model
    goes without the locals of the function that defined it (``__pydantic_parent_namespace__``, kept
    only to resolve forward references later): they are no part of the call, and may not pickle."""

    def reducer_override(self, obj):
        if isinstance(obj, functools._lru_cache_wrapper) and _goes_by_value(obj.__wrapped__):
            # pickle takes the wrapper by its name, from a module the container lacks (the flow's
            # script, a project module sent by value): rebuilt around the function instead, with
            # an empty cache; a warm process keeps the first one (`runtime_entry._with_kept_globals`)
            params = obj.cache_parameters()
            return _REBUILD_LRU_CACHE, (obj.__wrapped__, params["maxsize"], params["typed"])
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) > 2 \
                and isinstance(reduced[2], tuple) and reduced[2] and isinstance(reduced[2][0], dict):
            members = reduced[2][0]
            plain = {name: _plain_member(value) for name, value in members.items() if _is_task_member(value)}
            if members.get("__pydantic_parent_namespace__") is not None and getattr(obj, "__pydantic_complete__", False):
                plain["__pydantic_parent_namespace__"] = None
            if plain:
                return (*reduced[:2], ({**members, **plain}, *reduced[2][1:]), *reduced[3:])
        return reduced


def _is_prefect_task(value: Any) -> bool:
    # by name: the launchers do not import Prefect (the integration sits above them)
    return any(c.__name__ == "Task" and c.__module__ == "prefect.tasks" for c in type(value).__mro__)


def _goes_by_value(fn: Any) -> bool:
    """Would cloudpickle send `fn` by value (its module is the flow's script, or registered by value,
    or it is defined inside another function)?"""
    module = getattr(fn, "__module__", None)
    return (module == "__main__" or module in cloudpickle.list_registry_pickle_by_value()
            or "<locals>" in getattr(fn, "__qualname__", "") or sys.modules.get(module or "") is None)


def _lru_cache_rebuilder():
    def rebuild(fn, maxsize, typed):  # local, so cloudpickle sends it by value: the container has no prefect_mig
        import functools

        return functools.lru_cache(maxsize=maxsize, typed=typed)(fn)

    return rebuild


_REBUILD_LRU_CACHE = _lru_cache_rebuilder()


def _is_task_member(value: Any) -> bool:
    # a task, or `@classmethod` / `@staticmethod` stacked over one (Prefect's own tests do both orders)
    return _is_prefect_task(value) or (isinstance(value, (classmethod, staticmethod)) and _is_prefect_task(value.__func__))


def _plain_member(value: Any) -> Any:
    if isinstance(value, (classmethod, staticmethod)):
        inner = _plain_body(value.__func__)
        return inner if isinstance(inner, (classmethod, staticmethod)) else type(value)(inner)
    return _plain_body(value)


def _plain_body(task: Any) -> Any:
    """The function a Prefect task on a class runs, as the method kind it was declared as (the
    user's own, not a `MigTaskRunner` proxy around it)."""
    fn = task.fn
    while getattr(fn, "__prefect_mig__", None) is not None and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    if task.isstaticmethod:
        return staticmethod(fn)
    if task.isclassmethod:
        return classmethod(fn)
    return fn


#: what requests raises when the engine itself goes away: refused, reset, or cut mid-answer
_ENGINE_GONE = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)


#: how long the engine of a running container may refuse connections before its wait gives up
ENGINE_GONE_S = 10.0


def wait_for_exit(
    container, *, stop: Iterable[threading.Event | None] = (), poll_s: float, engine_gone_s: float = ENGINE_GONE_S
) -> int | None:
    """The exit code of a started `container`, or None as soon as one of the `stop` events is set
    (the container is left running: the caller kills or stops it as it needs).

    It polls Docker's ``wait`` every `poll_s`, so an exception raised into this thread (a sync task's
    timeout) lands between polls. A poll that runs out (`timed_out`) is a container still running,
    however long; an engine that refuses connections for `engine_gone_s` is gone, and its last error
    (a ``requests`` ``ConnectionError``) is raised. A container removed under us raises
    ``docker.errors.NotFound``.
    """
    stops = [event for event in stop if event is not None]
    refused_since = None
    while True:
        if any(event.is_set() for event in stops):
            return None
        try:
            return int(container.wait(timeout=poll_s)["StatusCode"])
        except (requests.exceptions.ReadTimeout, *_ENGINE_GONE) as exc:
            if timed_out(exc):
                refused_since = None
                continue
            # the engine itself went away (stopped, crashed, its host down), not a slow wait
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= engine_gone_s:
                raise
            time.sleep(min(poll_s, 1.0))


def timed_out(exc: BaseException) -> bool:
    """Whether a request error is only its read timeout running out (a wait that goes on), not the
    engine going away: requests reports a timeout while reading a streamed answer, as Docker's
    ``wait`` is, as a ``ConnectionError`` around urllib3's ``ReadTimeoutError``."""
    import urllib3.exceptions

    return isinstance(exc, requests.exceptions.ReadTimeout) or (
        isinstance(exc, requests.exceptions.ConnectionError)
        and any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args)
    )


@contextmanager
def _removed_means_stopped(container) -> Iterator[None]:
    """A container removed under us (the node agent fences containers whose lease ended) is a
    stopped container, not a Docker error."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise ContainerStopped(
            "the task container was removed while it ran (the node agent removes containers whose "
            "lease ended or whose fencing token is stale).",
            container_id=container.id,
        ) from exc
    except docker.errors.APIError as exc:
        # 409: its removal is under way; a 500 "RWLayer ... unexpectedly nil": the engine tore down its
        # file system mid-read (Docker 20.10 answers so while a forced removal runs)
        if exc.status_code != 409 and "unexpectedly nil" not in str(exc):
            raise
        raise ContainerStopped("the task container is being removed.", container_id=container.id) from exc


def died_without_outcome(container, exit_code: int, image: str) -> ContainerFailed:
    """The error for a task container that exited before it wrote an outcome (with its last output)."""
    with _removed_means_stopped(container):
        output = container.logs(tail=50).decode(errors="replace")
        container.reload()
    oom_killed = bool(container.attrs.get("State", {}).get("OOMKilled"))
    if oom_killed:
        limit = container.attrs.get("HostConfig", {}).get("Memory") or 0
        within = f" of its mem_limit ({limit / 2**20:g} MiB)" if limit else ""
        why = (f"ran out of memory{within}: the kernel killed it (exit code {exit_code}) before the body's outcome was "
               "written. Give the task a larger mem_limit, or make the body use less")
    else:
        why = f"exited with code {exit_code} without an outcome (killed? a body that called os._exit?)"
    return ContainerFailed(
        f"the task container {why}. Its last output:\n{output}",
        exit_code=exit_code,
        output=output,
        image=image,
        container_id=container.id,
        oom_killed=oom_killed,
    )


_UNCONFIRMED = "prefect_mig_removal_unconfirmed"


def mark_unconfirmed(exc: BaseException) -> None:
    """Mark `exc` (a timeout or cancellation raised into `DockerLauncher.run`'s thread, which stays
    what it is) as having left a task container whose removal the engine did not confirm: it may
    still run, so the caller must leave its lease to lapse, not release it (`removal_unconfirmed`)."""
    try:
        setattr(exc, _UNCONFIRMED, True)
    except AttributeError:  # an exception type without a __dict__: at worst the lease is released
        log.warning("could not mark %r as leaving an unconfirmed removal", exc)


def removal_unconfirmed(exc: BaseException) -> bool:
    """Whether `exc` left a task container whose removal was not confirmed (`DockerUnavailable`
    with ``unconfirmed``, or an interruption `mark_unconfirmed` marked): release no lease then."""
    return bool(getattr(exc, "unconfirmed", False) or getattr(exc, _UNCONFIRMED, False))


#: how long a removal that found another one under way waits for the container to be gone
REMOVAL_WAIT_S = 30.0


def remove_container(container, *, gone_within_s: float = REMOVAL_WAIT_S) -> bool:
    """Remove a task container with its runtime volume; True once the engine confirms it is gone
    (one already gone is fine). When another removal is under way (the engine's 409: the node
    agent fencing it meanwhile), the container is still there, maybe still running, until that
    one ends, so this waits up to `gone_within_s` for it to be gone (removing it again if that
    removal failed). Returns False when the engine did not answer or the container is still there
    when the wait ends: it may still run (the node's agent fences it later), so its lease must
    lapse rather than be released."""
    try:
        container.remove(force=True, v=True)  # v: with its runtime volume
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: someone else's removal is under way
            raise
        return _gone(container, within_s=gone_within_s)
    except _ENGINE_GONE:
        return False
    return True


def _gone(container, *, within_s: float) -> bool:
    """Wait up to `within_s` for the engine to have `container` no more (re-inspecting it, and
    removing it again if the removal under way ended without removing it); False if it is still
    there or the engine stops answering."""
    deadline, pause = time.monotonic() + within_s, 0.05
    while True:
        try:
            container.reload()
            if container.status != "removing":  # the other removal failed: try again
                container.remove(force=True, v=True)
                return True
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as exc:
            # 409: still being removed; 500 "... unexpectedly nil": its file system is being torn down
            if exc.status_code != 409 and "unexpectedly nil" not in str(exc):
                raise
        except _ENGINE_GONE:
            return False
        if time.monotonic() >= deadline:
            log.warning("task container %s is still there %.0f s after its removal began (state %s): not confirmed "
                        "removed, so its lease is left to lapse", container.short_id, within_s, container.status)
            return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 1.0)


class DockerLauncher:
    """Runs calls in containers on one Docker engine.

    Args:
        settings: image, engine, limits, network, volumes, GPU runtime.
    """

    def __init__(self, settings: ContainerSettings | None = None) -> None:
        self.settings = settings or ContainerSettings()
        self._client: docker.DockerClient | None = None
        self._checked = False

    @property
    def engine_url(self) -> str:
        """The URL of the engine this launcher uses (``unix://...``, ``tcp://host:port``, ...)."""
        return self.settings.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            url = self.engine_url
            try:
                client = engine_client(url, tls=self.settings.docker_tls)
                client.ping()
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                tls_hint = ""
                if url.startswith("tcp://"):
                    tls_hint = (" An engine on TCP with --tlsverify accepts only clients with a certificate its CA "
                                "signed: PREFECT_MIG_DOCKER_TLS_CA_FILE, ..._CERT_FILE and ..._KEY_FILE"
                                + (" (given, but refused)." if self.settings.docker_tls else " (not set)."))
                raise DockerUnavailable(
                    f"the Docker engine at {url} does not answer ({exc.__class__.__name__}). Start dockerd "
                    "on that node, or point PREFECT_MIG_DOCKER_HOST / the node's docker_url at a running engine."
                    + tls_hint,
                    image=self.settings.image,
                ) from exc
            self._client = client
        return self._client

    def python_version(self) -> tuple[int, int]:
        """The image's Python (major, minor), probed once per engine and image id.

        Raises:
            ImageNotFound: the image is not on the engine.
        """
        image = self._image()
        key = (self.client.api.base_url, image.id)
        if key not in _VERSIONS:
            _VERSIONS[key] = probe_python(self.client, image.id, self.settings.image)
        return _VERSIONS[key]

    def _image(self):
        try:
            return self.client.images.get(self.settings.image)
        except docker.errors.ImageNotFound as exc:
            raise ImageNotFound(
                f"image {self.settings.image!r} is not on the Docker engine at {self.engine_url}; "
                "no registry is pulled from. Build or load it there (e.g. `make image` builds "
                "prefect-mig-python:bookworm), or set the image to one the engine has.",
                image=self.settings.image,
            ) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(f"the Docker engine failed to look up the image: {exc}", image=self.settings.image) from exc

    def check_python(self) -> None:
        """Refuse an image whose Python minor version differs from this process's (checked once
        per launcher; an image replaced under the same tag is checked again by a new launcher)."""
        if self._checked:
            return
        self.check_network()
        theirs, ours = self.python_version(), tuple(sys.version_info[:2])
        if theirs != ours:
            raise ImagePythonMismatch(
                f"image {self.settings.image!r} runs Python {theirs[0]}.{theirs[1]} but the flow runs "
                f"{ours[0]}.{ours[1]}; cloudpickle needs the same minor version. Use an image with "
                f"python{ours[0]}.{ours[1]}.",
                image=self.settings.image,
            )
        self._checked = True

    def check_network(self) -> None:
        """Refuse a network the engine does not have (a ``container:<id>`` mode is the engine's to judge).

        Raises:
            LaunchError: naming the network and how to make it.
        """
        network = self.settings.network
        if network is None or ":" in network:
            return
        try:
            self.client.networks.get(network)
        except docker.errors.NotFound as exc:
            raise self._no_network() from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(f"the Docker engine failed to look up network {network!r}: {exc}", image=self.settings.image) from exc

    def _no_network(self) -> LaunchError:
        network = self.settings.network
        return LaunchError(
            f"network={network!r}: the Docker engine at {self.engine_url} has no such network. Create it there "
            f"(docker network create {network}) or leave network unset (the body then runs with networking off).",
            image=self.settings.image,
        )

    def run(
        self,
        fn: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        mig_uuid: str,
        labels: dict[str, str] | None = None,
        on_log: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        env: dict[str, str] | None = None,
        poll_s: float = 0.25,
        confirm: Callable[[], object] | None = None,
        side_values: dict[str, Any] | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a fresh container that sees only `mig_uuid`; return its
        value or raise its exception (with the container's traceback as ``__cause__``).

        `stop` (set by another thread: timeout, cancellation, lost lease) kills the container and
        raises `ContainerStopped`; set before the container starts, it never starts. `confirm`
        runs after the container is created and before it starts, and raises to refuse the start
        (see `start_confirmed`). The container is removed on every path; if the engine does not
        confirm it gone (`remove_container`), `DockerUnavailable` with ``unconfirmed`` is raised
        instead of the value or error, so the caller leaves its lease to lapse. `side_values` go
        with the call for the container's runtime (see `_pickle_call`).

        Raises:
            ImageNotFound, ImagePythonMismatch, DockerUnavailable, ContainerFailed, ContainerStopped,
            and whatever `confirm` raises.
        """
        self.check_python()
        payload = _pickle_call(fn, args, kwargs or {}, side_values)
        s = self.settings
        _not_stopped(stop)
        env, carried = _exec_sized(env or {})
        container = self.create(mig_uuid=mig_uuid, labels=labels, env=env)
        try:
            with _removed_means_stopped(container):
                outcome, exit_code = self._start_and_wait(container, payload, on_log, stop, poll_s, confirm, carried)
            if outcome is None:
                raise died_without_outcome(container, exit_code, s.image)
        except _ENGINE_GONE as exc:
            raise self._engine_gone(exc, removed=remove_container(container)) from exc
        except Exception as exc:
            if not remove_container(container):
                raise self._not_removed(container) from exc
            raise
        except BaseException as exc:  # a timeout or cancellation raised into this thread: it goes on as it is,
            if not remove_container(container):  # marked so its caller leaves the lease to lapse
                log.warning("task container %s: its removal was not confirmed while the call was interrupted; "
                            "its lease is left to lapse", container.short_id)
                mark_unconfirmed(exc)
            raise
        if not remove_container(container):
            raise self._not_removed(container)
        return value_of(outcome)

    def create(
        self,
        *,
        mig_uuid: str,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = (),
        **extra: Any,
    ):
        """Create (not start) a task container bound to `mig_uuid`, confined as the settings say;
        `command` adds arguments to the runtime's entry script, `extra` to ``containers.create``.

        Raises:
            ImageNotFound, DockerUnavailable.
        """
        s = self.settings
        env = {**s.env, **(env or {}), "NVIDIA_VISIBLE_DEVICES": mig_uuid, "CUDA_VISIBLE_DEVICES": mig_uuid, "PYTHONUNBUFFERED": "1"}
        create: dict[str, Any] = {
            "command": ["python3", f"{HOME}/entry.py", *command],
            "environment": env,
            "labels": {f"{LABEL_PREFIX}mig-uuid": mig_uuid, **{LABEL_PREFIX + k: str(v) for k, v in (labels or {}).items()}},
            "detach": True,
            "working_dir": HOME,
            **extra,
        }
        if s.network is None:
            create["network_disabled"] = True
        else:
            create["network"] = s.network
        create.update(slice_bound_options(s, mig_uuid))
        create.update(_hardening(s))
        launch_id = uuid.uuid4().hex  # finds the container if a timeout lands while it is being created
        create["labels"][f"{LABEL_PREFIX}launch-id"] = launch_id
        try:
            return self.client.containers.create(s.image, **create)
        except docker.errors.ImageNotFound as exc:
            raise ImageNotFound(f"image {s.image!r} is not on the engine: {exc}", image=s.image) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(f"could not create the task container: {exc}", image=s.image) from exc
        except BaseException:  # a Ctrl-C raised into this thread mid-create
            remove_launched(self.client, launch_id)
            raise

    def _start_and_wait(self, container, payload: bytes, on_log, stop, poll_s: float, confirm,
                        carried: dict[str, str]) -> tuple[tuple | None, int]:
        """Copy the runtime in, start, wait (or stop); the outcome (None: none written) and exit code."""
        container.put_archive(HOME, _runtime_archive(payload, carried))
        try:
            start_confirmed(container, stop, confirm)
        except docker.errors.NotFound as exc:
            container.reload()  # NotFound here: the container is gone (removed under us), as said on
            if self.settings.network is not None:  # it is there: the engine lacks what it refers to
                self.check_network()
            raise LaunchError(f"the Docker engine at {self.engine_url} could not start the task container: "
                              f"{exc.explanation or exc}", image=self.settings.image, container_id=container.id) from exc
        logger: threading.Thread | None = None
        if on_log is not None:
            logger = threading.Thread(target=self._stream_logs, args=(container, on_log), daemon=True)
            logger.start()
        exit_code = self._wait(container, stop, poll_s)
        if logger is not None:
            logger.join(timeout=5)
        return self._outcome(container), exit_code

    #: how long the engine of a running task container may refuse connections before the task fails
    ENGINE_GONE_S = ENGINE_GONE_S

    def _wait(self, container, stop: threading.Event | None, poll_s: float) -> int:
        # Short waits, so a timeout or cancellation raised into this thread lands between them.
        exit_code = wait_for_exit(container, stop=(stop,), poll_s=poll_s, engine_gone_s=self.ENGINE_GONE_S)
        if exit_code is None:
            container.kill()
            raise ContainerStopped("the task container was stopped before the body finished.", container_id=container.id)
        return exit_code

    def _not_removed(self, container) -> DockerUnavailable:
        """The error for a task container whose removal the engine did not confirm (see
        `remove_container`): it may still run, so its lease must lapse, not be released."""
        return DockerUnavailable(
            f"the task container {container.short_id} could not be confirmed removed from the Docker engine at "
            f"{self.settings.docker_host or 'the local socket'} (it did not answer, or another removal of it did not "
            f"finish within {REMOVAL_WAIT_S:g} s); the node's agent removes it later. Run the task again if it failed.",
            image=self.settings.image,
            unconfirmed=True,
        )

    def _engine_gone(self, exc: Exception, *, removed: bool) -> DockerUnavailable:
        return DockerUnavailable(
            f"the Docker engine at {self.settings.docker_host or 'the local socket'} stopped answering while "
            f"the task container ran ({exc.__class__.__name__}); the body's outcome is lost. Run the task again.",
            image=self.settings.image,
            unconfirmed=not removed,
        )

    @staticmethod
    def _outcome(container) -> tuple | None:
        try:
            stream, _ = container.get_archive(f"{HOME}/result.pkl")
        except docker.errors.NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile("result.pkl")
            return load_outcome(member.read()) if member else None

    @staticmethod
    def _stream_logs(container, on_log: Callable[[str], None]) -> None:
        pending = ""
        try:
            for chunk in container.logs(stream=True, follow=True):
                pending += chunk.decode(errors="replace")
                *lines, pending = pending.split("\n")
                for line in lines:
                    on_log(line)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            pass
        if pending:
            on_log(pending)
