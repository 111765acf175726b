"""`MigTaskRunner`: run Prefect task bodies in containers bound to leased MIG slices.

Per task, with the drop-in decorator::

    from prefect_mig import task, MigTaskRunner

    @task(task_runner=MigTaskRunner(profile="1g.10gb", priority=5))
    def infer(batch): ...

Per flow: ``@flow(task_runner=MigTaskRunner())`` sends every submitted task tagged ``mig:<profile>``
(or ``mig:>=20gb``) to a lease + container and runs the others as the thread pool does; with a
profile, ``MigTaskRunner(profile="1g.10gb")``, it sends every task, of that profile unless tagged
(``mig:none`` keeps a task in the flow's process). Tags
``mig:<profile>``, ``mig-priority:<n>`` and ``mig-tenant:<name>`` override the runner per call; on a
flow run (or its deployment) they apply to its tasks that set none themselves (the task's tags, then
the runner's arguments, then the flow run's tags).

Only the body runs in the container; Prefect's engine (states, retries, caching, timeouts, logs)
stays in the flow's process. Each try takes a fresh lease, renewed while the body runs and
released on every exit path. While a task waits for its slice, its run shows the state
``AwaitingMIG``; once leased, a log line and a ``prefect-mig.lease.granted`` event say which slice
on which GPU and node (no extra Running state unless the try waited). If the lease is lost (expired, or revoked for a higher priority or by an admin), the container is
stopped and the task fails saying so. If the flow run is cancelled, a waiting try withdraws its
request, a running one's container is stopped, its lease released, and the task run ends Cancelled. The body sees ``CUDA_VISIBLE_DEVICES`` /
``NVIDIA_VISIBLE_DEVICES`` (the MIG UUID) and ``PREFECT_MIG_LEASE_ID``, ``PREFECT_MIG_FENCE``,
``PREFECT_MIG_TASK_RUN_ID``, ``PREFECT_MIG_FLOW_RUN_ID`` and ``PREFECT_MIG_RUN_COUNT`` (1 on the
first try), and ``PREFECT_MIG_RUN_CONTEXT`` (JSON behind the body's Prefect context).

What a body sees of Prefect: in an image with only python3, a stand-in answers ``get_run_logger()``
and ``prefect.runtime`` (`prefect_mig.launchers.runtime_shim`); in an image with Prefect, Prefect's
own ``FlowRunContext`` / ``TaskRunContext`` hydrated from the engine's task run and flow run
(`prefect_mig.launchers.runtime_prefect`). Either way ``get_run_logger()`` records reach the task
run's logs through the flow's process, with networking off. Submitting tasks from a body needs the
Prefect API, so it needs ``network=`` (``"host"`` when the API is on the flow's host): networking
stays off unless the user asks, because the container is confined by default and only the user
knows whether its body may reach anything.

With ``keep_warm_s``, a try's container and process stay on the leased slice for the next try of
the same runner in the flow run (`prefect_mig.integrations.prefect.warm`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Pending, Running
from prefect.task_engine import TaskRunTimeoutError
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.engine import emit_task_run_state_change_event

from prefect_mig.allocator import Allocator, Lease, LeaseInfo, SliceRequest, health
from prefect_mig.allocator.allocator import check_ttl, check_wait
from prefect_mig.allocator.connection import client_for_url, url_options
from prefect_mig.allocator.embedded import redis_url
from prefect_mig.errors import (
    ConfigError,
    ContainerFailed,
    ContainerStopped,
    DockerUnavailable,
    LeaseLost,
    PrefectMigError,
    RedisUnavailable,
    TryCancelled,
    WaitTimeout,
)
from prefect_mig.gpu import default_gpu_runtime
from prefect_mig.integrations.prefect.arguments import plain_arguments
from prefect_mig.integrations.prefect.artifacts import record_task_slice
from prefect_mig.integrations.prefect.context import announce_lease, body_context, flow_cancelled, log_sink, prefect_env
from prefect_mig.integrations.prefect.context import flow_side_values, run_in_slice_async, run_in_slice_sync
from prefect_mig.integrations.prefect.context import picklable_state as _picklable_state
from prefect_mig.integrations.prefect.context import acquire_started, lease_event, shielded, start_lease, undo_acquire
from prefect_mig.integrations.prefect.direct_calls import keeps_off_slices, route_direct_calls, wants_slice
from prefect_mig.integrations.prefect.profiles import NO_SLICE_TAG, check_known, check_tags
from prefect_mig.integrations.prefect.warm import (
    adopt_into,
    check_warm,
    take_into,
    end_with_flow_run,
    local_waiter,
    passed_slot,
    warm_key,
)
from prefect_mig.launchers import ContainerSettings, DockerLauncher
from prefect_mig.launchers.docker import check_call_pickles, cluster_labels, removal_unconfirmed
from prefect_mig.launchers.warm_pool import POOL, WarmSlot
from prefect_mig.launchers.engines import docker_tls_from
from prefect_mig.settings import load_settings

AWAITING_MIG = "AwaitingMIG"
_PROFILE_TAG, _PRIORITY_TAG, _TENANT_TAG = "mig:", "mig-priority:", "mig-tenant:"
_ALLOCATORS: dict[tuple[str, str], Allocator] = {}
_ALLOCATORS_LOCK = threading.Lock()
_LOCAL_CHECKED: dict[str, float] = {}  # state dir -> when a live local agent was last confirmed
_LOCAL_LOCK = threading.Lock()


def _allocator(url: str, namespace: str) -> Allocator:
    with _ALLOCATORS_LOCK:
        key = (url, namespace)
        if key not in _ALLOCATORS:
            settings = load_settings()
            client = client_for_url(url, socket_connect_timeout=2, socket_timeout=10, **url_options(settings, url))
            _ALLOCATORS[key] = Allocator(
                client, namespace, replicas=settings.redis_replicas, replica_timeout_s=settings.redis_replica_timeout_s,
                wait_ttl_s=settings.wait_ttl_s, max_ttl_s=settings.lease_max_ttl_s,
            )
        return _ALLOCATORS[key]


def _ensure_local_agent(settings, allocator: Allocator, logger) -> None:
    """On the embedded default, start this host's background agent (`prefect_mig.local_cluster`,
    as ``prefect-mig up`` does) unless a live one heartbeats and holds its node; checked at most every 10 s."""
    import time

    from prefect_mig.local_cluster import LocalCluster, local_nodes

    key = str(settings.state_dir)
    with _LOCAL_LOCK:
        if time.monotonic() - _LOCAL_CHECKED.get(key, float("-inf")) < 10:
            return
        nodes = local_nodes(settings)
        if not health.serving(allocator, nodes):
            local = LocalCluster(settings)
            pid, started = local.ensure()
            if started:
                message = (
                    f"no live node agent for this host: started the local cluster in the background (pid {pid}; "
                    f"log {local.log_file}; `prefect-mig status` shows it, `prefect-mig down` stops it)"
                )
                (logger or logging.getLogger("prefect_mig")).warning(message)
            local.wait_for_agents(allocator, nodes)
        _LOCAL_CHECKED[key] = time.monotonic()


def _check_wait_and_workers(wait_timeout_s: Any, max_workers: Any) -> None:
    """`wait_timeout_s`: None (the setting) or seconds >= 0 (0: do not wait, fail at once when no
    slice is free); `max_workers`: None or an integer >= 1."""
    number = isinstance(wait_timeout_s, (int, float)) and not isinstance(wait_timeout_s, bool)
    if wait_timeout_s is not None and not number:
        raise ConfigError(
            f"MigTaskRunner wait_timeout_s={wait_timeout_s!r}: give a number of seconds from 0 (do not wait), or "
            "leave it unset for PREFECT_MIG_WAIT_TIMEOUT_S.", field="wait_timeout_s", value=wait_timeout_s,
        )
    check_wait(wait_timeout_s, field="wait_timeout_s")  # the range the allocator holds each try to
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1):
        raise ConfigError(
            f"MigTaskRunner max_workers={max_workers!r}: give an integer >= 1, or leave it unset.",
            field="max_workers", value=max_workers,
        )


def _check_request_types(priority: Any, preemptible: Any, image: Any) -> None:
    """What pydantic would coerce, refused: ``priority=True`` is not priority 1, ``preemptible="yes"``
    not a yes, and an empty `image` not the default image."""
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ConfigError(f"MigTaskRunner priority={priority!r}: give an integer from 0 to 100 (higher first), or "
                          "leave it unset.", field="priority", value=priority)
    if not isinstance(preemptible, bool):
        raise ConfigError(f"MigTaskRunner preemptible={preemptible!r}: give True or False.",
                          field="preemptible", value=preemptible)
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ConfigError(f"MigTaskRunner image={image!r}: give an image name (repository[:tag]), or leave it unset "
                          "for prefect-mig-python:bookworm.", field="image", value=image)


class MigTaskRunner(ThreadPoolTaskRunner):
    """A task runner that leases a MIG slice per task try and runs the body in a container there.

    Args:
        profile: exact MIG profile (``1g.10gb``) or minimums (``>=20gb``, ``>=3g``); None at flow
            level means "only tasks tagged ``mig:...``". At flow level with a profile, a task
            tagged ``mig:none`` still runs in the flow's process.
        priority: 0-100, higher first.
        tenant: charged for the slices (quotas).
        preemptible: a higher-priority request may revoke the lease (the task then fails).
        image, env, volumes, network, cpus, mem_limit: the container (see `ContainerSettings`).
            ``network`` None (the default) keeps networking off; a body in an image with Prefect
            that submits tasks needs one from which the Prefect API is reachable (``"host"``).
        cluster: a `MigCluster` block (Redis URL, namespace and defaults); else the settings.
        lease_ttl_s: lease TTL, renewed every third of it.
        wait_timeout_s: how long a try may wait for a slice (None: ``PREFECT_MIG_WAIT_TIMEOUT_S``,
            default an hour; 0: do not wait, fail at once when no slice is free); the error then
            says why it waited. Priority, tenant, lease_ttl_s, wait_timeout_s and max_workers are
            checked at construction, with or without a profile (`ConfigError` naming the field).
        max_workers: thread-pool size, as for `ThreadPoolTaskRunner`.
        container_options: loosen the task container's confinement for a body that needs it:
            ``read_only_root``, ``tmp_size``, ``no_new_privileges``, ``cap_add``, ``pids_limit``,
            ``user`` (see `ContainerSettings`; by default the root file system is read-only, every
            capability is dropped, no-new-privileges is on and processes are limited to 4096).
        keep_warm_s: keep a task's container and Python process on its slice (lease held) for up
            to this long after its body ends, for the next task of this runner in the same flow run
            (same profile, priority, tenant, image, env, volumes): that body then runs in the same
            process, with no new container or lease. 0 (default): a fresh container per try. A
            warm slice is handed over at once when anyone else could use it; a try that failed,
            timed out or was cancelled is never reused, and retries get a fresh container (see
            `prefect_mig.integrations.prefect.warm`).
        share_warm: widen reuse beyond one flow run: ``"deployment"`` (runs of the same
            deployment) or ``"tenant"`` (any run of the same tenant in this process).

    Examples:
        ```python
        from prefect_mig import MigTaskRunner

        runner = MigTaskRunner(profile="1g.10gb", priority=5, image="prefect-mig-python:bookworm")
        assert runner.duplicate() == runner
        ```
    """

    def __init__(
        self,
        profile: str | None = None,
        *,
        priority: int | None = None,
        tenant: str | None = None,
        preemptible: bool = False,
        image: str | None = None,
        env: dict[str, str] | None = None,
        volumes: list[str] | None = None,
        network: str | None = None,
        cpus: float | None = None,
        mem_limit: str | None = None,
        cluster: Any = None,
        lease_ttl_s: float | None = None,
        wait_timeout_s: float | None = None,
        max_workers: int | None = None,
        container_options: dict[str, Any] | None = None,
        keep_warm_s: float = 0,
        share_warm: str | None = None,
    ) -> None:
        _check_wait_and_workers(wait_timeout_s, max_workers)
        _check_request_types(priority, preemptible, image)
        _check_container_fields(env=env, volumes=volumes, network=network, cpus=cpus, mem_limit=mem_limit)
        super().__init__(max_workers=max_workers)
        self.profile = profile
        self.priority = priority
        self.tenant = tenant
        self.preemptible = preemptible
        self.image = image
        self.env = dict(env or {})
        self.volumes = list(volumes or [])
        self.network = network
        self.cpus = cpus
        self.mem_limit = mem_limit
        self.cluster = cluster
        self.lease_ttl_s = lease_ttl_s
        self.wait_timeout_s = wait_timeout_s
        self.container_options = dict(container_options or {})
        _check_container_options(self.container_options)
        self.keep_warm_s, self.share_warm = check_warm(keep_warm_s, share_warm)
        self._launchers: dict[str | None, DockerLauncher] = {}  # runtime state: one per Docker engine
        self._flow_cancelled = threading.Event()  # runtime state: cancel_all meant a cancellation
        self._exiting_normally = False
        try:  # the cluster's maximum, which every acquire checks; first, so that its message wins
            check_ttl(self._ttl(), load_settings().lease_max_ttl_s, field="lease_ttl_s")
        except ConfigError as exc:
            raise ConfigError(f"MigTaskRunner {exc}", field=exc.field, value=exc.value) from None
        # validates priority, tenant and lease_ttl_s early, with or without a profile (a flow-level
        # runner's tasks name theirs in tags); 1g.10gb only stands in for a missing one here
        self.request_for(profile or "1g.10gb", priority or 0, tenant or "default")
        if profile is not None:
            check_known(profile)  # against the catalog: a typo fails here, not at the first run

    # configuration only, as RayTaskRunner does
    def _config(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("profile", "priority", "tenant", "preemptible", "image", "env", "volumes", "network",
                      "cpus", "mem_limit", "cluster", "lease_ttl_s", "wait_timeout_s", "container_options",
                      "keep_warm_s", "share_warm")
        } | {"max_workers": self._max_workers}

    def duplicate(self) -> MigTaskRunner:
        return type(self)(**self._config())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MigTaskRunner) and self._config() == other._config()

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ runtime state

    def cancel_all(self) -> None:
        """Prefect calls this from every ``__exit__``; only outside a normal exit does it stop
        the containers (see `prefect_mig.integrations.prefect.context`)."""
        if not self._exiting_normally:
            self._flow_cancelled.set()
        super().cancel_all()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        # A flow that returns or raises an ordinary exception lets running tasks finish, as
        # ThreadPoolTaskRunner does; a TerminationSignal/KeyboardInterrupt is a cancellation.
        self._exiting_normally = exc_type is None or issubclass(exc_type, Exception)
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._exiting_normally = False

    def __getstate__(self) -> dict[str, Any]:
        return _picklable_state(super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._launchers, self._flow_cancelled, self._exiting_normally = {}, threading.Event(), False

    # ------------------------------------------------------------------ what to ask for

    def request_for(self, profile: str, priority: int, tenant: str, holder: str = "") -> SliceRequest:
        """The `SliceRequest` for one try (``profile`` may be ``>=20gb``-style minimums)."""
        from pydantic import ValidationError

        from prefect_mig.model import SliceRequirement

        try:
            need = SliceRequirement.parse(profile, field="profile")
            return SliceRequest(
                **need.model_dump(exclude_none=True),
                priority=priority,
                tenant=tenant,
                holder=holder[:256],
                ttl_s=self._ttl(),
                preemptible=self.preemptible,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            # the runner's argument for the request's ttl_s is lease_ttl_s
            loc = ["lease_ttl_s" if x == "ttl_s" else str(x) for x in first["loc"]]
            raise ConfigError(
                f"MigTaskRunner {'.'.join(loc)}={first.get('input')!r}: "
                f"{first['msg'].removeprefix('Value error, ')}",
                field=loc[0] if loc else None,
                value=first.get("input"),
            ) from exc

    def _ttl(self) -> float:
        if self.lease_ttl_s is not None:
            return self.lease_ttl_s
        return float(getattr(self.cluster, "lease_ttl_s", None) or 60.0)

    def _resolved(self, tags: set[str], flow_run_tags: Iterable[str] = ()) -> tuple[str | None, int, str]:
        """Profile, priority and tenant of one try; most specific wins: the task's tags, then this
        runner's arguments, then the flow run's tags (a deployment's tags are its runs'), then the
        cluster's default priority."""
        own, run = _tag_values(tags), _tag_values(flow_run_tags)
        profile = own.get("profile") or self.profile or run.get("profile")
        priority = own.get("priority", self.priority if self.priority is not None else run.get("priority"))
        tenant = own.get("tenant") or self.tenant or run.get("tenant")
        if priority is None:
            priority = int(getattr(self.cluster, "default_priority", 0) or 0)
        return profile, int(priority), tenant or "default"

    def _allocator(self, logger=None) -> Allocator:
        if self.cluster is not None:
            return _allocator(self.cluster.redis_url.get_secret_value(), self.cluster.namespace)
        settings = load_settings()
        allocator = _allocator(redis_url(settings), settings.namespace)
        if settings.redis_url is None:  # the embedded default: this host is the cluster
            _ensure_local_agent(settings, allocator, logger)
        return allocator

    def _launcher(self, docker_url: str | None) -> DockerLauncher:
        if docker_url not in self._launchers:
            self._launchers[docker_url] = self._new_launcher(docker_url)
        return self._launchers[docker_url]

    def _new_launcher(self, docker_url: str | None) -> DockerLauncher:
        settings = load_settings()
        cluster = self.cluster
        return DockerLauncher(
            ContainerSettings(
                image=self.image or getattr(cluster, "image", None) or "prefect-mig-python:bookworm",
                docker_host=docker_url or getattr(cluster, "docker_host", None) or settings.docker_host,
                docker_tls=(cluster.docker_tls() if hasattr(cluster, "docker_tls") else None) or docker_tls_from(settings),
                env=self.env,
                volumes=self.volumes,
                network=self.network,
                cpus=self.cpus,
                mem_limit=self.mem_limit,
                gpu_runtime=getattr(cluster, "gpu_runtime", None) or default_gpu_runtime(settings),
                # the container's confinement (read-only root, capabilities, pids, user): the block's, then ours
                **{**(getattr(cluster, "container_options", None) or {}), **self.container_options},
            )
        )

    # ------------------------------------------------------------------ one try

    def run_in_slice(self, fn, args: tuple, kwargs: dict, stop: threading.Event | None = None) -> Any:
        """Lease a slice, run ``fn(*args, **kwargs)`` in a container bound to it, release.

        `stop` (set by another thread: an async task's timeout or cancellation) ends the wait
        for a slice or kills the container, like a cancellation of the flow run. The task's own
        ``timeout_seconds`` does the same from here (`_TaskDeadline`), raising Prefect's
        ``TaskRunTimeoutError``, so the run ends TimedOut even where Prefect's timeout for a
        sync task, an exception raised into this thread, was lost."""
        ctx = TaskRunContext.get()
        deadline = _TaskDeadline(ctx)
        try:
            return self._run_try(fn, args, kwargs, ctx, _AnyEvent(stop, deadline.passed))
        except (TryCancelled, WaitTimeout) as exc:  # what stopping the wait or the container raises
            if deadline.passed.is_set() and not (stop is not None and stop.is_set()):
                flow_run = _cancel_event(ctx)
                if flow_run is None or not flow_run.is_set():  # a cancelled flow run still ends Cancelled
                    raise TaskRunTimeoutError(f"Scope timed out after {deadline.seconds:g} second(s).") from exc
            raise
        finally:
            deadline.cancel()

    def _run_try(self, fn, args: tuple, kwargs: dict, ctx, stop: "_AnyEvent") -> Any:
        """`run_in_slice`'s try, ended early when `stop` is set."""
        args, kwargs = plain_arguments(args, kwargs)
        tags = set(ctx.task_run.tags) if ctx else set()
        if NO_SLICE_TAG in tags:  # only a task-level runner gets here with it: at call time or with_options
            raise ConfigError(
                f"tags: {NO_SLICE_TAG!r} keeps a task off slices, and this task's task_runner=MigTaskRunner(...) "
                "sends it to one: drop the tag (with tags(...) around the call, or with_options), or the runner.",
                field="tags", value=NO_SLICE_TAG,
            )
        flow_ctx = FlowRunContext.get()
        profile, priority, tenant = self._resolved(tags, getattr(getattr(flow_ctx, "flow_run", None), "tags", None) or ())
        if profile is None:
            raise ConfigError(
                "this task asks for no MIG slice: give MigTaskRunner(profile=...) or tag it 'mig:<profile>'.",
                field="profile",
            )
        holder = f"{ctx.task_run.flow_run_id}/{ctx.task_run.id}" if ctx else "local"
        request = self.request_for(profile, priority, tenant, holder)
        logger = get_run_logger() if ctx else None
        warm_key = self._warm_key(request, ctx, flow_ctx)
        check_call_pickles(fn, args, kwargs)  # before any slice is leased or warm process taken
        cancelled = _AnyEvent(_cancel_event(ctx), stop)
        # The taken warm slot and the started Lease, put here by the helper thread that took or
        # started it: a timeout raised into this thread anywhere after (even before `shielded`
        # returns) finds them in the finally below.
        taken: list[WarmSlot] = []
        started: list[Lease] = []
        lease_options = {"on_lost": POOL.lost if warm_key else None, "on_notice": POOL.notice if warm_key else None}
        slot, got, reusable = None, None, False
        ended = {"what": "released", "reason": ""}  # what the lease event at the end says
        ran_from = time.monotonic()
        try:
            slot = shielded(take_into, warm_key, taken, keep_warm_s=self.keep_warm_s) if warm_key else None
            allocator = slot.lease.allocator if slot else self._allocator(logger)  # a warm hit skips the settings
            if slot is None:
                try:  # a bad image fails before any lease is taken (launcher.run checks the slice's engine again)
                    self._launcher(None).check_python()
                except DockerUnavailable:
                    pass  # no engine here: the slices live on nodes with engines of their own
                timeout_s = self.wait_timeout_s if self.wait_timeout_s is not None else load_settings().wait_timeout_s
                got = shielded(acquire_started, allocator, request, started, wait=timeout_s != 0,
                               undo=undo_acquire(allocator), **lease_options)
            waited = slot is None and not started
            if waited:
                with _awaiting_state(ctx, allocator, got.request_id, request, logger) as waiting, \
                        local_waiter(warm_key, got.request_id) as passed:
                    try:
                        got = allocator.wait_for_grant(got.request_id, timeout_s, request=request, stop=_AnyEvent(cancelled, passed.stop))
                    except (WaitTimeout, LeaseLost) as exc:
                        slot = passed_slot(passed)
                        if slot is None and isinstance(exc, WaitTimeout) and cancelled.is_set():
                            raise TryCancelled(
                                f"the flow run was cancelled while this task waited for a {request.requirement} slice: "
                                "the wait was withdrawn."
                            ) from exc
                        if slot is None and (isinstance(exc, LeaseLost) or cancelled.is_set()):
                            raise
                        if slot is None:
                            raise WaitTimeout(
                                f"{exc} It waited because: {waiting.text}. A longer wait: MigTaskRunner(wait_timeout_s=...) "
                                "or PREFECT_MIG_WAIT_TIMEOUT_S.",
                                lease_id=exc.lease_id,
                            ) from exc
                    if slot is None:  # granted: the grant (`got`) is released below until it is a started Lease
                        shielded(start_lease, allocator, got, started, undo=undo_acquire(allocator), **lease_options)
            lease = slot.lease if slot is not None else started[0]
            lost, ran_from = lease.lost, time.monotonic()
            s = lease.slice
            where = f"{s.profile}@{s.start} on {s.node} GPU {s.gpu_index} ({s.mig_uuid})"
            if waited:  # back from AwaitingMIG; otherwise the engine's own Running state stands
                _running_message(ctx, f"leased {where}, fence {lease.fence}")
            announce_lease(ctx, lease, where)
            if logger and slot is not None:
                logger.info("reusing the warm process on %s (call %d in it), fence %s", where, slot.container.calls + 1, lease.fence)
            elif logger:
                logger.info("leased %s, waited %.2f s, fence %s", where, lease.info.waited_ms / 1000, lease.fence)
            if slot is None:  # a new container: on the engine of the node that owns the slice
                launcher = self._launcher(allocator.node_docker_url(s.node))
                labels = _container_labels(allocator, lease, ctx)
            env, side = self._body_env(lease, ctx), flow_side_values(flow_ctx)
            on_log, stopped = (log_sink(logger) if logger else None), _AnyEvent(lost, cancelled)
            try:
                if warm_key is None:
                    return launcher.run(fn, args, kwargs, mig_uuid=s.mig_uuid, labels=labels, on_log=on_log, stop=stopped,
                                        env=env, confirm=lease.confirm, side_values=side)
                if slot is None:
                    slot = shielded(adopt_into, warm_key, lease, launcher, labels, taken, keep_warm_s=self.keep_warm_s)
                value = slot.container.call(fn, args, kwargs, env=env, on_log=on_log, stop=stopped, side_values=side)
                reusable = True
                return value
            except DockerUnavailable as exc:
                if exc.unconfirmed:  # its container may still run: the slice must not go to another holder
                    lease.abandon()
                    ended.update(what="lost", reason="unconfirmed")
                    what = (f"Its container's end could not be confirmed, so the lease on {where} was left to lapse, "
                            f"not released: the slice goes to another task only once {s.node}'s agent confirms no "
                            "container of it remains.")
                else:
                    what = f"The lease on {where} was released."
                raise DockerUnavailable(
                    f"node {s.node}'s Docker engine failed: {exc} {what} While the engine is down the node's agent "
                    f"keeps {s.node} out of service, so new tasks go to other nodes.",
                    image=exc.image, unconfirmed=exc.unconfirmed,
                ) from exc
            except LeaseLost as exc:  # the lease's last-moment renewal before its container started
                ended.update(what="revoked" if exc.reason == "revoked" else "lost", reason=exc.reason)
                raise
            except (ContainerStopped, ContainerFailed) as exc:
                why = _why_container_ended(exc, cancelled.is_set(), allocator, lease, where)
                if why is None:
                    raise  # the body's container died with its lease intact
                if isinstance(why, LeaseLost):
                    ended.update(what="revoked" if why.reason == "revoked" else "lost", reason=why.reason)
                raise why from exc
            except BaseException as exc:  # a timeout or cancellation raised into this thread mid-call
                if removal_unconfirmed(exc):  # its container may still run: the slice must not go on
                    lease.abandon()
                    ended.update(what="lost", reason="unconfirmed")
                raise
        finally:  # a timeout raised into this thread must not skip the release
            slot = slot or (taken[0] if taken else None)
            ending = sys.exc_info()[1]
            try:
                if slot is not None:
                    shielded(POOL.finish, slot, reusable=reusable)
                elif started:
                    shielded(started[0].release)
                elif isinstance(got, LeaseInfo):  # granted after a wait, interrupted before it was started
                    shielded(allocator.release, got.lease_id, got.fence)
            except RedisUnavailable as exc:
                if ending is None:
                    raise
                # the error that ended the try says why (a lease Redis could not renew, say); this
                # one would hide it. The lease, if Redis still holds it, lapses within its TTL.
                if logger:
                    logger.warning("the lease could not be released: %s", exc)
            if ctx is not None and (slot is not None or started):
                lease = slot.lease if slot is not None else started[0]
                ran_s = time.monotonic() - ran_from
                if slot is None or not reusable:  # a warm slot keeps its lease for the next call
                    lease_event(ctx, lease, ended["what"], reason=ended["reason"], ran_s=round(ran_s, 3))
                record_task_slice(ctx, lease, outcome=ended["reason"] or ended["what"], ran_s=ran_s)

    def _body_env(self, lease: Lease, ctx) -> dict[str, str]:
        """What the body's container sees: its lease and fence (to fence its own side effects),
        the task and flow run it belongs to, and Prefect's settings for it (`prefect_env`)."""
        return {
            "PREFECT_MIG_LEASE_ID": lease.lease_id,
            "PREFECT_MIG_FENCE": str(lease.fence),
            "PREFECT_MIG_TASK_RUN_ID": str(ctx.task_run.id if ctx else ""),
            "PREFECT_MIG_FLOW_RUN_ID": str(ctx.task_run.flow_run_id if ctx else ""),
            "PREFECT_MIG_RUN_COUNT": str(ctx.task_run.run_count if ctx else 1),
            "PREFECT_MIG_RUN_CONTEXT": body_context(ctx),
            **(prefect_env(ctx, self.network, self.env) if ctx else {}),
        }

    def _warm_key(self, request: SliceRequest, ctx, flow_ctx):
        """Which warm slots a try may reuse (None: none, a fresh container; see `warm_key`)."""
        key = warm_key(self, request, ctx, flow_ctx) if self.keep_warm_s else None
        if key is not None and key[0][0] == "flow-run":
            end_with_flow_run(flow_ctx, key[0])
        return key

    # ------------------------------------------------------------------ flow level

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        return super().submit(self.slice_task(task), parameters, wait_for=wait_for, dependencies=dependencies)

    def slice_task(self, task):
        """`task`, with its body sent to a slice when it asks for one (direct calls, see
        `prefect_mig.integrations.prefect.direct_calls`): a ``mig:`` tag, or every task when this
        runner, as a flow's, has a profile of its own."""
        if getattr(task.fn, "__prefect_mig__", None) or keeps_off_slices(task) or not (self.profile or wants_slice(task)):
            return task
        return _with_body(task, slice_body(task.fn, self))

    def __enter__(self):
        route_direct_calls()
        return super().__enter__()


def _container_labels(allocator: Allocator, lease: Lease, ctx) -> dict[str, Any]:
    """A task container's labels: its cluster (what the agent's fencing and leftover checks
    select by), its lease and fence, its slice, and its task and flow run."""
    s = lease.slice
    return {
        **cluster_labels(cluster_id=allocator.cluster_id(), namespace=allocator.keys.namespace, node=s.node),
        "lease-id": lease.lease_id,
        "fence": lease.fence,
        "slice": f"{s.node}/{s.gpu_index}/{s.profile}@{s.start}",
        "flow-run-id": ctx.task_run.flow_run_id if ctx else "",
        "task-run-id": ctx.task_run.id if ctx else "",
    }


def _why_container_ended(exc: Exception, cancelled: bool, allocator: Allocator, lease: Lease, where: str) -> Exception | None:
    """What a task's container stopping or failing means: the flow run was cancelled
    (`TryCancelled`), the lease was lost, revoked or its container removed (`LeaseLost`, with the
    reason), or None: the body's own container died with its lease intact."""
    if cancelled:
        return TryCancelled(
            f"the flow run was cancelled: the container on {where} was stopped and the lease released.",
            container_id=exc.container_id,
        )
    reason = _lost_reason(allocator, lease)
    if reason is None and isinstance(exc, ContainerFailed):
        return None
    reason = reason or "removed"
    what = (f"the container of the lease on {where} was removed while the task ran. " if reason == "removed"
            else f"the lease on {where} was {reason} while the task ran: its container was stopped. ")
    return LeaseLost(
        what + _LOST_WHY.get(reason, "It could not be renewed in time (Redis unreachable or the process paused)."),
        reason=reason,
        lease_id=lease.lease_id,
    )


def _tag_values(tags: Iterable[str]) -> dict[str, Any]:
    """``mig:``, ``mig-priority:`` and ``mig-tenant:`` tags as {profile, priority, tenant}.

    Raises:
        ConfigError: a malformed one (``mig-priority:high``), naming the tag and what is allowed;
            a task's own tags were checked when it was made, not a flow run's or call-time ones.
    """
    tags = tuple(tags)
    check_tags(tags)
    out: dict[str, Any] = {}
    for tag in tags:
        if tag.startswith(_PRIORITY_TAG):
            out["priority"] = int(tag[len(_PRIORITY_TAG):])
        elif tag.startswith(_TENANT_TAG):
            out["tenant"] = tag[len(_TENANT_TAG):]
        elif tag.startswith(_PROFILE_TAG) and tag != NO_SLICE_TAG:
            out["profile"] = tag[len(_PROFILE_TAG):]
    return out


_LOST_WHY = {
    "revoked": "It was revoked: by a higher-priority request (the task is preemptible), or by an admin.",
    "fenced": "Its fencing token is stale: the node agent removed the container of an older holder.",
    "gone": "Redis no longer holds it (expired, or Redis lost its data), so the node agent removed the container.",
    "removed": "The lease is intact, so something else removed the container (docker rm, or an agent of "
    "another prefect-mig version that does not keep to its own cluster).",
}


def _lost_reason(allocator: Allocator, lease: Lease) -> str | None:
    """Why the container of a still-held lease may have been stopped: the renewal's verdict, else
    what Redis says now (``gone``, ``fenced``); ``None`` when the lease is intact."""
    if lease.lost_reason is not None:
        return getattr(lease.lost_reason, "reason", "lost")
    try:
        current = allocator.lease(lease.lease_id)
    except LeaseLost as exc:
        return exc.reason
    except PrefectMigError:
        return "lost"
    return None if current.fence == lease.fence else "fenced"


def slice_body(fn, runner: MigTaskRunner):
    """Wrap `fn` so that each call runs in a container on a leased slice (sync or async `fn`; a
    generator function is refused with `ConfigError`)."""
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(
            f"task {getattr(fn, '__qualname__', fn)!r} is a generator function (it yields): its body runs in a "
            "container on a MIG slice, and values come back only once the body has ended, so a task on a "
            "slice cannot stream them. Make it return a list (e.g. `return list(...)`), or run it off the "
            "slice (no `mig:` tag, no MigTaskRunner).",
            field="fn",
            value=getattr(fn, "__qualname__", fn),
        )
    # A try that the flow run's cancellation stopped returns a Cancelled state, which Prefect's task
    # engine takes as the task run's final state (an exception would make it Failed).
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def proxy(*args, **kwargs):
            try:
                return await run_in_slice_async(runner, _sync_twin(fn), args, kwargs)
            except TryCancelled as exc:
                return Cancelled(message=str(exc))
    else:
        @functools.wraps(fn)
        def proxy(*args, **kwargs):
            try:
                return run_in_slice_sync(runner, fn, args, kwargs)
            except TryCancelled as exc:
                return Cancelled(message=str(exc))
    proxy.__prefect_mig__ = runner
    return proxy


def _sync_twin(fn):
    def run(*args, **kwargs):
        import asyncio

        return asyncio.run(fn(*args, **kwargs))

    run.__module__, run.__qualname__ = fn.__module__, fn.__qualname__
    run.__signature__ = inspect.signature(fn)  # the task run's parameters, in an image with Prefect
    return run


def _with_body(task, body):
    import copy

    clone = copy.copy(task)
    clone.fn = body
    return clone


#: ContainerSettings fields MigTaskRunner(container_options=...) and the block may set
CONTAINER_OPTIONS = ("read_only_root", "tmp_size", "no_new_privileges", "cap_add", "pids_limit", "user")


def _check_container_fields(**fields: Any) -> None:
    """Refuse env, volumes, network, cpus or mem_limit that task containers cannot be made with
    now, naming the argument (not at the first task's run, after its lease was taken)."""
    from pydantic import ValidationError

    if isinstance(fields["volumes"], str):
        raise ConfigError(
            f"MigTaskRunner volumes={fields['volumes']!r}: give a list of 'host_or_name:/container/path[:ro|rw]' "
            "strings, not one string.",
            field="volumes",
            value=fields["volumes"],
        )
    try:
        ContainerSettings(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"MigTaskRunner {'.'.join(map(str, first['loc']))}={first.get('input')!r}: "
            f"{first['msg'].removeprefix('Value error, ')}",
            field=str(first["loc"][0]),
            value=first.get("input"),
        ) from exc


def _check_container_options(options: dict[str, Any]) -> None:
    """Refuse an unknown or invalid container option now, naming it (not at the first task's run)."""
    from pydantic import ValidationError

    unknown = sorted(set(options) - set(CONTAINER_OPTIONS))
    if unknown:
        raise ConfigError(
            f"MigTaskRunner container_options {unknown[0]!r} is not a container option; allowed: "
            f"{', '.join(CONTAINER_OPTIONS)}.",
            field="container_options",
            value=unknown[0],
        )
    try:
        ContainerSettings(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"MigTaskRunner container_options {first['loc'][0]}={first.get('input')!r}: {first['msg']}",
            field="container_options",
            value=first.get("input"),
        ) from exc


class _TaskDeadline:
    """The task's own ``timeout_seconds``, kept by the runner: `passed` is set once they have gone
    by since the try began (a little after Prefect's own clock started).

    Prefect times out a sync task in a worker thread by raising an exception into that thread.
    Python drops one that lands in a finalizer (a urllib3 connection's, under load: "Exception
    ignored in: <finalize object>"), and the body then ran to its end and the task Completed.
    With `passed` among the try's stop events, the container is stopped and the lease released at
    the deadline whether or not Prefect's exception arrives."""

    def __init__(self, ctx) -> None:
        self.seconds = getattr(getattr(ctx, "task", None), "timeout_seconds", None)
        self.passed = threading.Event()
        self._timer: threading.Timer | None = None
        if self.seconds:
            self._timer = threading.Timer(self.seconds, self.passed.set)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _AnyEvent:
    """Set when any of its events is set (the launcher and the wait only call ``is_set``)."""

    def __init__(self, *events) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _cancel_event(ctx):
    """Set when this task run's flow run is really cancelled, not on a normal exit (context.py)."""
    return flow_cancelled(ctx)


class _awaiting_state:
    """Show ``AwaitingMIG`` (a Pending state) while waiting, with why it waits (queue position,
    agents whose heartbeat lapsed, kinds no GPU is carved into) in the state's message and the run
    log, refreshed every `refresh_s` while it waits; then Running again."""

    def __init__(self, ctx, allocator: Allocator, request_id: str, request: SliceRequest, logger, refresh_s: float = 15.0) -> None:
        self.ctx, self.allocator, self.request_id, self.request = ctx, allocator, request_id, request
        self.logger, self.refresh_s = logger, refresh_s
        self.text = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="prefect-mig-awaiting")

    def _explain(self) -> None:
        try:
            reasons = health.wait_reasons(self.allocator, self.request_id)
        except PrefectMigError as exc:
            reasons = [f"Redis did not answer ({exc.__class__.__name__})"]
        text = "; ".join(reasons) or "every matching slice is leased"
        if text == self.text:
            return
        self.text = text
        message = f"waiting for a {self.request.requirement} slice: {text}"
        if self.ctx is not None:
            _emit(self.ctx, Pending(name=AWAITING_MIG, message=message))
        if self.logger is not None:
            stale = any("agent" in r for r in reasons)
            (self.logger.warning if stale else self.logger.info)(
                "%s (priority %s, tenant %s)", message, self.request.priority, self.request.tenant
            )

    def _refresh(self) -> None:
        self._explain()
        while not self._done.wait(self.refresh_s):
            self._explain()

    def __enter__(self):
        # Explained off the wait's path: with a map of 100 tasks, 100 explanations (Redis reads, a
        # state and a log line to the API) before the first touch let queued requests lapse.
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)
        if self.ctx is not None and exc[0] is not None:  # on success the lease message follows
            _emit(self.ctx, Running(message=f"stopped waiting: {exc[1]}"))
        return False


def _running_message(ctx, message: str) -> None:
    if ctx is not None:
        _emit(ctx, Running(message=message))


def _emit(ctx, state) -> None:
    run = ctx.task_run
    last = run.state
    state.state_details.task_run_id = run.id
    state.state_details.flow_run_id = run.flow_run_id
    run.state = state
    run.state_id, run.state_type, run.state_name = state.id, state.type, state.name
    emit_task_run_state_change_event(task_run=run, initial_state=last, validated_state=state)
