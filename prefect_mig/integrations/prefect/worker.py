"""`MigDockerWorker`: the ``mig-docker`` work pool type. Each flow run leases a MIG slice and runs in a
Docker container bound to it, on the engine of the node that owns the slice.

Create a pool and start a worker (the type is registered through the ``prefect.collections`` entry
point of this package)::

    prefect work-pool create gpu --type mig-docker
    prefect worker start --pool gpu --type mig-docker

Per flow run the worker: checks the job variables (a bad one fails the run naming it, before any
lease is taken); queues for a slice, the flow run showing the Pending state ``AwaitingMIG`` with
why it waits (queue position, agents whose heartbeat lapsed, kinds no GPU is carved into); once
leased, says which slice in a Pending state's message and the run log; starts the flow run's
container (``prefect flow-run execute``) with ``CUDA_VISIBLE_DEVICES`` / ``NVIDIA_VISIBLE_DEVICES``
set to the MIG UUID and the lease's labels, so the node agent fences it like a task container,
and confined like one (read-only root, no capabilities, no-new-privileges, a pids limit; job
variable ``container_options`` loosens it); names the slice in the Running state's message once
Prefect's engine in the container has set Running; renews the lease while the container runs; and
releases the lease on every exit path. The flow run's ``infrastructure_pid`` is ``<engine url>:<container id>``. A
flow run cancelled from the UI (also while it waits) has its wait withdrawn or its container
stopped, its lease released, and ends Cancelled.

A worker that dies mid-run leaves a container whose lease nobody renews: the lease ends within its
TTL (job variable ``lease_ttl_s``), the node agent removes the container, and the next sweep of
any worker of the pool (`MigDockerWorker.crash_orphaned_runs`, at start and every 30 s) marks the
run Crashed.

The container reaches the Prefect API with the worker's ``PREFECT_API_URL``; the default network
``host`` makes a ``127.0.0.1`` API reachable. The image needs Prefect and the flow's code (a pull
step, a volume, or baked in): ``prefect-mig image build`` builds one offline.

Examples:
    ```python
    from prefect_mig.integrations.prefect.worker import MigDockerWorker

    template = MigDockerWorker.get_default_base_job_template()
    assert {"profile", "priority", "tenant", "image"} <= set(template["variables"]["properties"])
    assert MigDockerWorker.type == "mig-docker"
    ```
"""

from __future__ import annotations

import shlex
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import anyio
import anyio.lowlevel
import anyio.to_thread
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Crashed, Failed, Pending
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

from prefect_mig.errors import ConfigError, LaunchError, PrefectMigError, Unsatisfiable, WaitTimeout
from prefect_mig.integrations.prefect.context import own_thread
from prefect_mig.model.catalog import catalog

if TYPE_CHECKING:
    from prefect_mig.allocator import Lease

# Prefect imports this module in every process it starts (the `prefect.collections` entry point,
# the server's included), so Docker, Redis and the task runner are imported where they are used.

_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
_CANCEL = {StateType.CANCELLING, StateType.CANCELLED}
_SWEEP_S = 30.0  # how often a worker looks for its pool's orphaned flow runs (crash_orphaned_runs)


def known_profiles() -> list[str]:
    """Every MIG profile name of the catalog's GPU models (the job variable's choices)."""
    return sorted({p.name for m in catalog().models.values() for p in m.profiles})


_PROFILE_HELP = (
    "The MIG slice the flow run needs: a profile such as 1g.10gb, or minimums such as >=20gb, >=3g "
    "or >=3g,>=40gb (the smallest free slice that meets them)."
)


_CONFINEMENT_HELP = (
    "The flow run's container is confined like a task container: read-only root file system with a "
    "tmpfs /tmp (HOME and PREFECT_HOME then point into /tmp), every capability dropped, "
    "no-new-privileges, at most 4096 processes. Loosen it with keys read_only_root (false), tmp_size "
    "('1g'), no_new_privileges (false), cap_add (e.g. ['CHOWN'], or ['ALL'] for Docker's defaults), "
    "pids_limit (a number, or null), user ('uid[:gid]')."
)


class MigDockerVariables(BaseVariables):
    """The job variables a deployment or a flow run may set (rendered as a form in the UI).

    Others are refused (the pool's schema has ``additionalProperties: false``): the API answers
    422 naming one (`prority`, `ttl`) when the deployment or the run is created, rather than a run
    that ignores it."""

    profile: Union[Literal[tuple(known_profiles())], str] = Field(  # type: ignore[valid-type]
        default="1g.10gb", title="MIG profile", description=_PROFILE_HELP, examples=["1g.10gb", ">=20gb"]
    )
    priority: int = Field(default=0, ge=0, le=100, title="Priority", description="0 to 100; higher is served first.")
    tenant: str = Field(default="default", min_length=1, title="Tenant", description="Charged for the slice (quotas).")
    preemptible: bool = Field(
        default=False, title="Preemptible", description="A higher-priority request may revoke the lease (the run then crashes)."
    )
    wait_timeout_s: Optional[float] = Field(
        default=None, ge=0, title="Wait timeout (s)",
        description="How long the run may wait for a slice; unset: PREFECT_MIG_WAIT_TIMEOUT_S (an hour).",
    )
    image: str = Field(
        default=..., title="Image",
        description="Image with Prefect and the flow's code (`prefect-mig image build` makes one offline).",
    )
    volumes: list[str] = Field(
        default_factory=list, title="Volumes", description="As 'host_path_or_volume:/container/path[:ro|rw]'.",
    )
    network: Optional[str] = Field(
        default="host", title="Network",
        description="Docker network of the container; 'host' reaches an API on 127.0.0.1; 'none' cuts it off.",
    )
    cpus: Optional[float] = Field(default=None, gt=0, title="CPUs", description="CPU limit in cores.")
    mem_limit: Optional[str] = Field(default=None, pattern=r"^\d+[bkmgBKMG]?$", title="Memory limit", description="E.g. 4g.")
    container_options: dict[str, Any] = Field(
        default_factory=dict, title="Container confinement", description=_CONFINEMENT_HELP,
        examples=[{"read_only_root": False}, {"cap_add": ["CHOWN"], "user": "65534:65534"}],
    )
    lease_ttl_s: Optional[float] = Field(
        default=None, ge=5, le=3600, title="Lease TTL (s)",
        description="The worker renews the slice's lease every third of this; if the worker dies, the lease ends "
        "within it and the node agent stops the container. Unset: 60; at most the cluster's "
        "PREFECT_MIG_LEASE_MAX_TTL_S (900 s by default).",
    )


class MigDockerJobConfiguration(BaseJobConfiguration):
    """One flow run's job, rendered from the pool's base job template and the job variables.

    Its fields are loosely typed on purpose: a value the template or a flow run got wrong reaches
    the worker, which fails the run with a message naming the variable.
    """

    profile: Any = Field(default="1g.10gb", json_schema_extra={"template": "{{ profile }}"})
    priority: Any = Field(default=0, json_schema_extra={"template": "{{ priority }}"})
    tenant: Any = Field(default="default", json_schema_extra={"template": "{{ tenant }}"})
    preemptible: Any = Field(default=False, json_schema_extra={"template": "{{ preemptible }}"})
    wait_timeout_s: Any = Field(default=None, json_schema_extra={"template": "{{ wait_timeout_s }}"})
    image: Any = Field(default=None, json_schema_extra={"template": "{{ image }}"})
    volumes: Any = Field(default_factory=list, json_schema_extra={"template": "{{ volumes }}"})
    network: Any = Field(default="host", json_schema_extra={"template": "{{ network }}"})
    cpus: Any = Field(default=None, json_schema_extra={"template": "{{ cpus }}"})
    mem_limit: Any = Field(default=None, json_schema_extra={"template": "{{ mem_limit }}"})
    container_options: Any = Field(default_factory=dict, json_schema_extra={"template": "{{ container_options }}"})
    lease_ttl_s: Any = Field(default=None, json_schema_extra={"template": "{{ lease_ttl_s }}"})

    def runner(self):
        """A `MigTaskRunner` holding this job's slice request and container settings (it checks
        them), whose allocator and launchers the worker uses.

        Raises:
            ConfigError: a job variable cannot be used; ``field`` names it.
        """
        from prefect_mig.integrations.prefect.runner import MigTaskRunner

        if not isinstance(self.profile, str) or not self.profile.strip():
            raise ConfigError(f"job variable profile={self.profile!r}: give a MIG profile or minimums. {_PROFILE_HELP}", field="profile", value=self.profile)
        profile = self.profile.strip()
        if not profile.startswith(">="):
            known = known_profiles()
            if profile not in known:
                raise ConfigError(
                    f"job variable profile={profile!r} is not a MIG profile of any known GPU model; use one of "
                    f"{', '.join(known[:8])}, ... or minimums such as '>=20gb'.",
                    field="profile", value=profile,
                )
        if not isinstance(self.image, str) or not self.image:
            raise ConfigError(
                "job variable image is not set: the flow run's container needs an image with Prefect and the "
                "flow's code (`prefect-mig image build` makes one); set it on the pool, deployment or run.",
                field="image", value=self.image,
            )
        from prefect_mig.settings import load_settings

        max_ttl_s = load_settings().lease_max_ttl_s  # the cluster's; the pool's schema allows up to 3600
        checks = (("priority", self.priority), ("tenant", self.tenant), ("wait_timeout_s", self.wait_timeout_s),
                  ("lease_ttl_s", self.lease_ttl_s), ("container_options", self.container_options))
        for field, value in checks:
            bad = (field == "priority" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100)) or (
                field == "tenant" and (not isinstance(value, str) or not value)) or (
                field == "wait_timeout_s" and value is not None and (not isinstance(value, (int, float)) or value < 0)) or (
                field == "lease_ttl_s" and value is not None and (not isinstance(value, (int, float)) or not 5 <= value <= max_ttl_s)) or (
                field == "container_options" and value is not None and not isinstance(value, dict))
            if bad:
                allowed = {"priority": "an integer from 0 to 100", "tenant": "a non-empty name",
                           "wait_timeout_s": "seconds >= 0, or unset", "lease_ttl_s": f"seconds from 5 to {max_ttl_s:g} (PREFECT_MIG_LEASE_MAX_TTL_S), or unset",
                           "container_options": "an object such as {\"read_only_root\": false}"}[field]
                raise ConfigError(f"job variable {field}={value!r} is not allowed: give {allowed}.", field=field, value=value)
        try:
            runner = MigTaskRunner(
                profile, priority=self.priority, tenant=self.tenant, preemptible=bool(self.preemptible),
                image=self.image, volumes=list(self.volumes or []), cpus=self.cpus, mem_limit=self.mem_limit,
                wait_timeout_s=self.wait_timeout_s, lease_ttl_s=self.lease_ttl_s,
                container_options=dict(self.container_options or {}),
            )
            runner._new_launcher(None)  # validates volumes, cpus and mem_limit as ContainerSettings does
        except ConfigError as exc:
            raise ConfigError(f"job variable {str(exc).removeprefix('MigTaskRunner ')}", field=exc.field, value=exc.value) from exc
        except ValueError as exc:  # pydantic's ValidationError of ContainerSettings
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": ("?",), "msg": str(exc), "input": None}
            field = str(first["loc"][0]) if first["loc"] else "?"
            raise ConfigError(f"job variable {field}={first.get('input')!r}: {first['msg']}", field=field, value=first.get("input")) from exc
        return runner


class MigDockerWorkerResult(BaseWorkerResult):
    """The outcome of one flow run's container (``identifier``: its infrastructure pid)."""


class MigDockerWorker(BaseWorker):
    """Runs each flow run in a Docker container bound to a leased MIG slice (work pool type ``mig-docker``).

    Examples:
        ```python
        from prefect_mig.integrations.prefect.worker import MigDockerWorker

        assert MigDockerWorker.get_default_base_job_template()["variables"]["required"] == ["image"]
        ```
    """

    type = "mig-docker"
    job_configuration = MigDockerJobConfiguration
    job_configuration_variables = MigDockerVariables
    _display_name = "MIG Docker"
    _description = (
        "Runs each flow run in a Docker container bound to a NVIDIA MIG slice leased from a prefect-mig "
        "cluster, with priorities, tenants and fencing; the flow run waits in AwaitingMIG until its slice is free."
    )
    _documentation_url = "https://github.com/prefect-mig/prefect-mig#deploy-and-run-from-the-prefect-ui"
    _logo_url = "https://images.ctfassets.net/gm98wzqotmnx/4nGlDhE3Hd9kE2lVSPHvBe/9b6a4a5e15c13bd2e2f6c9e0d4c3b4c5/gpu.png"  # noqa: E501

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        template = super().get_default_base_job_template()
        # Prefect's BaseVariables drops additionalProperties from the schema; without it a job
        # variable the pool lacks (a typo) is accepted and silently ignored.
        template["variables"]["additionalProperties"] = False
        return template

    async def get_and_submit_flow_runs(self):
        """Prefect's poll for scheduled runs, and every `_SWEEP_S` the sweep for orphaned runs."""
        runs = await super().get_and_submit_flow_runs()
        if self._has_successfully_synced and time.monotonic() - getattr(self, "_swept_at", float("-inf")) >= _SWEEP_S:
            self._swept_at = time.monotonic()
            try:
                await self.crash_orphaned_runs()
            except Exception as exc:  # noqa: BLE001 - a sweep that failed is tried again next time
                self._logger.warning("could not look for orphaned flow runs of pool %s: %s", self._work_pool_name, exc)
        return runs

    async def crash_orphaned_runs(self) -> list[str]:
        """Mark Crashed this pool's flow runs that no worker runs any more: Pending or Running with a
        container (``infrastructure_pid``) that is gone or has exited, no lease held for them, and
        not run by this worker.

        That is what is left when a worker dies mid-run (SIGKILL, a lost host): nobody renews the
        run's lease, so it ends within its TTL (``lease_ttl_s``) and the node agent removes the
        container; the next sweep of any worker of the pool (every 30 s, and when one starts) marks
        the run Crashed, so Prefect's retries and automations apply. Returns the ids marked.
        """
        from prefect.client.schemas.filters import (
            FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
        )

        runs = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self._work_pool_name])),
            limit=200,
        )
        mine = getattr(self, "_running_ids", set())
        runs = [r for r in runs if r.id not in mine and r.infrastructure_pid and ":" in r.infrastructure_pid]
        if not runs:
            return []
        # a run whose lease is still held is someone's (a live worker's on another host, whose local
        # engine URL reads like ours): only a run without a lease and without a container is orphaned
        from prefect_mig.integrations.prefect.runner import MigTaskRunner

        runner = MigTaskRunner()
        allocator = await anyio.to_thread.run_sync(runner._allocator, self._logger)
        held = {row.get("holder") for row in (await anyio.to_thread.run_sync(allocator.status))["leases"]}
        crashed = []
        for run in runs:
            if f"flow-run/{run.id}" in held:
                continue
            gone = await anyio.to_thread.run_sync(_container_gone, run.infrastructure_pid, runner)
            if gone is None:
                continue
            state = (await self.client.read_flow_run(run.id)).state
            if state is None or state.type not in (StateType.PENDING, StateType.RUNNING) or run.id in mine:
                continue
            message = (f"its container {gone}, and no worker runs it (its worker stopped mid-run): the slice's lease "
                       "ended within its TTL and the node agent removed the container.")
            await self.client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            self._logger.warning("flow run %s: %s", run.id, message)
            crashed.append(str(run.id))
        return crashed

    async def _submit_adhoc_run(self, flow, *args, **kwargs):
        """An ``@mig`` flow's call: Prefect pickles the flow into the bundle the container runs. An
        `InfrastructureBoundFlow` carries this worker's class, so unpickling it would need prefect-mig
        in the image: the bundle gets the plain flow (with its launcher), and the pool's default
        result storage set on it so that the caller can read the result."""
        from prefect.flows import Flow, InfrastructureBoundFlow

        if isinstance(flow, InfrastructureBoundFlow):
            plain = Flow.__new__(Flow)
            plain.__dict__.update({k: v for k, v in flow.__dict__.items() if k not in ("work_pool", "job_variables", "worker_cls")})
            block_id = self.work_pool.storage_configuration.default_result_storage_block_id
            if plain.result_storage is None and block_id is not None:
                from prefect.results import aresolve_result_storage

                plain.result_storage, plain.persist_result = await aresolve_result_storage(block_id), True
            flow = plain
        return await super()._submit_adhoc_run(flow, *args, **kwargs)

    async def run(self, flow_run, configuration: MigDockerJobConfiguration, task_status=None) -> MigDockerWorkerResult:
        self._running_ids = getattr(self, "_running_ids", set())
        self._running_ids.add(flow_run.id)
        try:
            return await self._run(flow_run, configuration, task_status)
        finally:
            self._running_ids.discard(flow_run.id)

    async def _run(self, flow_run, configuration: MigDockerJobConfiguration, task_status=None) -> MigDockerWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        try:
            runner = configuration.runner()
            request = runner.request_for(runner.profile, runner.priority, runner.tenant, f"flow-run/{flow_run.id}")
        except ConfigError as exc:
            logger.error("%s", exc)
            await self.client.set_flow_run_state(flow_run.id, Failed(message=str(exc)), force=True)
            if task_status is not None:
                task_status.started("")
            return MigDockerWorkerResult(status_code=0, identifier="")

        cancelled = threading.Event()
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(self._watch_cancel, flow_run.id, cancelled)
            try:
                return await self._run_leased(flow_run, configuration, runner, request, cancelled, logger, task_status)
            finally:
                watchers.cancel_scope.cancel()

    async def _run_leased(self, flow_run, configuration, runner, request, cancelled, logger, task_status):
        import docker.errors

        from prefect_mig.allocator import Lease, LeaseInfo
        from prefect_mig.launchers.docker import remove_container
        from prefect_mig.launchers.docker import LABEL_PREFIX, cluster_labels

        allocator = await anyio.to_thread.run_sync(runner._allocator, logger)
        try:
            got = await anyio.to_thread.run_sync(lambda: allocator.try_acquire(request, wait=runner.wait_timeout_s != 0))
        except (ConfigError, Unsatisfiable) as exc:
            # a profile of the catalog that this fleet's GPUs lack, or minimums none of them meets:
            # refused before anything is queued; raised, Prefect would say "unhandled errors in a TaskGroup"
            message = f"job variable profile={configuration.profile!r}: {str(exc).removeprefix('profile: ')}"
            logger.error("%s", message)
            await self.client.set_flow_run_state(flow_run.id, Failed(message=message), force=True)
            if task_status is not None:
                task_status.started("")
            return MigDockerWorkerResult(status_code=1, identifier="")
        if not isinstance(got, LeaseInfo):
            got = await self._wait(flow_run, allocator, got.request_id, request, runner, cancelled, logger)
            if got is None:  # cancelled while waiting: the wait is withdrawn, nothing is held
                await self._end_cancelled(flow_run.id, "cancelled while waiting for a MIG slice; the wait was withdrawn.")
                if task_status is not None:
                    task_status.started("")
                return MigDockerWorkerResult(status_code=0, identifier="")
        lost = threading.Event()
        lease = Lease(allocator, got, on_lost=lambda held, exc: lost.set()).start_renewing()
        container, removed, started = None, True, False
        try:
            s = lease.slice
            where = f"{s.profile}@{s.start} on {s.node} GPU {s.gpu_index} ({s.mig_uuid})"
            logger.info("leased %s, waited %.2f s, fence %s", where, got.waited_ms / 1000, lease.fence)
            await self.client.set_flow_run_state(flow_run.id, Pending(message=f"leased {where}, fence {lease.fence}"), force=True)
            docker_url = allocator.node_docker_url(s.node)
            labels = {
                **configuration.labels,
                **{LABEL_PREFIX + k: str(v) for k, v in {
                    **cluster_labels(cluster_id=allocator.cluster_id(), namespace=allocator.keys.namespace, node=s.node),
                    "mig-uuid": s.mig_uuid, "lease-id": lease.lease_id, "fence": lease.fence,
                    "slice": f"{s.node}/{s.gpu_index}/{s.profile}@{s.start}", "flow-run-id": flow_run.id,
                }.items()},
            }
            env = {
                **{k: v for k, v in configuration.env.items() if v is not None},
                "NVIDIA_VISIBLE_DEVICES": s.mig_uuid, "CUDA_VISIBLE_DEVICES": s.mig_uuid,
                "PREFECT_MIG_LEASE_ID": lease.lease_id, "PREFECT_MIG_FENCE": str(lease.fence),
                "PREFECT_MIG_FLOW_RUN_ID": str(flow_run.id),
            }
            launcher = runner._launcher(docker_url)
            workdir = None
            if "prefect.bundles.execute" in (configuration.command or ""):  # an @mig flow's bundle
                from prefect_mig.integrations.prefect.bundle_dir import bundle_directory

                workdir = bundle_directory(getattr(self.work_pool, "storage_configuration", None))
            container = await anyio.to_thread.run_sync(
                lambda: _start_container(launcher, configuration.command, env, labels, s.mig_uuid, configuration.network,
                                         workdir, lease, lost)
            )
            pid = _infrastructure_pid(launcher, container)
            if task_status is not None:
                task_status.started(pid)
            started = True
            async with anyio.create_task_group() as group:
                group.start_soon(self._say_slice_when_running, flow_run.id, f"running on {where}, fence {lease.fence}")
                status = await anyio.to_thread.run_sync(
                    _wait_container, container, cancelled, lost, launcher.engine_url, abandon_on_cancel=True,
                    limiter=own_thread(),
                )
                group.cancel_scope.cancel()
            if cancelled.is_set():
                await self._end_cancelled(flow_run.id, f"cancelled: the container on {where} was stopped and the lease released.")
                status = 0
            elif lost.is_set():
                reason = getattr(lease.lost_reason, "reason", "lost")
                await self.client.set_flow_run_state(
                    flow_run.id, Crashed(message=f"the lease on {where} was {reason} while the flow ran: its container was stopped."),
                    force=True,
                )
                status = 0
            return MigDockerWorkerResult(status_code=status, identifier=pid)
        except (LaunchError, docker.errors.DockerException) as exc:
            logger.error("could not run the flow run's container on %s: %s", lease.slice.node, exc)
            removed = not getattr(exc, "unconfirmed", False)
            if started:
                raise
            # the run ends saying why (raised, Prefect would say "unhandled errors in a TaskGroup")
            state, message = _start_failure(exc, configuration.image, lease.slice.node)
            await self.client.set_flow_run_state(flow_run.id, state(message=message), force=True)
            if task_status is not None:
                task_status.started("")
            return MigDockerWorkerResult(status_code=1, identifier="")
        finally:
            # shielded: an @mig caller leaving its worker's task group (its run ended) cancels this
            # task, and the container must still go and the lease be released
            with anyio.CancelScope(shield=True):
                if container is not None:
                    await self._log_output_unless_completed(flow_run.id, container, logger)
                    removed = await anyio.to_thread.run_sync(remove_container, container) and removed
                if removed:
                    await anyio.to_thread.run_sync(lease.release)
                else:  # the container may still run: its slice must not go to another holder
                    lease.abandon()
                    logger.warning("the container's removal on %s was not confirmed: its lease is left to lapse, and "
                                   "the slice goes to another run once the node's agent confirms none remains",
                                   lease.slice.node)

    async def _log_output_unless_completed(self, flow_run_id, container, logger, lines: int = 40) -> None:
        """Put the last `lines` of the container's output in the run log when the run did not end
        Completed or Cancelled: what Prefect's engine printed before it could log to the API (an
        import error, a bundle it could not load) is otherwise lost with the container."""
        import docker.errors
        import requests.exceptions

        try:
            state = (await self.client.read_flow_run(flow_run_id)).state
        except Exception:  # noqa: BLE001 - without the state, log the output anyway
            state = None
        if state is not None and state.type in (StateType.COMPLETED, StateType.CANCELLED, StateType.CANCELLING):
            return
        try:
            output = await anyio.to_thread.run_sync(lambda: container.logs(tail=lines).decode(errors="replace"))
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return
        if output.strip():
            logger.error("the flow run's container %s printed (last %d lines):\n%s", container.short_id, lines, output.rstrip())

    async def _wait(self, flow_run, allocator, request_id, request, runner, cancelled, logger):
        """Wait for the grant in a thread while the flow run shows AwaitingMIG with why it waits;
        None when the run was cancelled (the wait is then withdrawn). A worker stopping (this task
        cancelled) stops the wait too: the request is withdrawn, and a grant that raced either end
        is released, so nothing is held or queued for a run that will not start here."""
        from prefect_mig.allocator import health
        from prefect_mig.integrations.prefect.runner import AWAITING_MIG
        from prefect_mig.settings import load_settings

        timeout_s = runner.wait_timeout_s if runner.wait_timeout_s is not None else load_settings().wait_timeout_s
        shown = ""
        stop = threading.Event()  # set when the run is cancelled or this task is (the worker stops)

        async def explain() -> None:
            nonlocal shown
            while True:
                try:
                    reasons = await anyio.to_thread.run_sync(health.wait_reasons, allocator, request_id)
                except PrefectMigError as exc:
                    reasons = [f"Redis did not answer ({exc.__class__.__name__})"]
                text = "; ".join(reasons) or "every matching slice is leased"
                if text != shown:
                    shown = text
                    message = f"waiting for a {request.requirement} slice: {text}"
                    logger.info("%s (priority %s, tenant %s)", message, request.priority, request.tenant)
                    if not cancelled.is_set():
                        await self.client.set_flow_run_state(flow_run.id, Pending(name=AWAITING_MIG, message=message), force=True)
                await anyio.sleep(15)

        async def stop_when_cancelled() -> None:
            # the waiting thread cannot be cancelled (to_thread shields it): this task, which is,
            # tells it to stop, within one wake-up of the wait
            try:
                while not cancelled.is_set():
                    await anyio.sleep(0.1)
            finally:
                stop.set()

        got = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(explain)
                group.start_soon(stop_when_cancelled)
                try:
                    got = await anyio.to_thread.run_sync(
                        lambda: allocator.wait_for_grant(request_id, timeout_s, request=request, stop=stop),
                        limiter=own_thread(),
                    )
                except WaitTimeout as exc:
                    if cancelled.is_set():
                        return None
                    await anyio.lowlevel.checkpoint()  # the worker is stopping: its cancellation ends this
                    message = (f"{exc} It waited because: {shown}. A longer wait: job variable wait_timeout_s "
                               "or PREFECT_MIG_WAIT_TIMEOUT_S.")
                    await self.client.set_flow_run_state(flow_run.id, Failed(message=message), force=True)
                    raise WaitTimeout(message, lease_id=exc.lease_id) from exc
                finally:
                    group.cancel_scope.cancel()
            if await self._cancel_requested(flow_run.id, cancelled):
                # cancelled as the grant came, before the cancel watch saw it: the Pending state
                # that follows a grant would override the cancel, and the run would start
                await self._give_up(allocator, request_id, logger)
                return None
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):  # the grant, or the request the thread never waited on
                await self._give_up(allocator, request_id, logger)
            raise
        return got

    @staticmethod
    async def _give_up(allocator, request_id: str, logger) -> None:
        try:
            await anyio.to_thread.run_sync(allocator.give_up, request_id)
        except PrefectMigError as exc:  # Redis down: the request lapses with its wait TTL, a grant with its TTL
            logger.warning("could not withdraw the wait for a slice (%s); it lapses on its own", exc)

    async def _say_slice_when_running(self, flow_run_id, message: str) -> None:
        """Once the flow run's engine (in the container) has set Running, set Running again with
        `message` (the slice), so the UI's Running state names it. Should the flow end between our
        read and our write, its final state is put back."""
        from prefect.states import Running

        while True:
            try:
                state = (await self.client.read_flow_run(flow_run_id)).state
            except Exception:  # noqa: BLE001 - the API may blink; the next poll tries again
                state = None
            if state is not None and (state.type in _FINAL or state.type in _CANCEL):
                return
            if state is not None and state.type == StateType.RUNNING:
                if message in (state.message or ""):
                    return
                ours = (await self.client.set_flow_run_state(
                    flow_run_id, Running(name=state.name, message=message), force=True)).state
                history = sorted(await self.client.read_flow_run_states(flow_run_id), key=lambda st: st.timestamp)
                before = [st for st in history if ours is not None and st.timestamp < ours.timestamp and st.id != ours.id]
                latest = (await self.client.read_flow_run(flow_run_id)).state
                if before and before[-1].type in _FINAL and latest is not None and latest.id == getattr(ours, "id", None):
                    await self._put_back(flow_run_id, before[-1])
                return
            await anyio.sleep(0.5)

    async def _put_back(self, flow_run_id, final) -> None:
        """Set `final` (a final state read from the API) again, with its result. Prefect's
        `set_flow_run_state` drops a state's data unless it is a result record of this process, and
        a Completed state without it fails the caller's ``.result()`` with MissingResult."""
        from uuid import uuid4

        from prefect.client.schemas.actions import StateCreate

        details = final.state_details.model_copy(update={"flow_run_id": flow_run_id, "transition_id": uuid4()})
        again = StateCreate(type=final.type, name=final.name, message=final.message, data=final.data, state_details=details)
        await self.client.request(
            "POST", "/flow_runs/{id}/set_state", path_params={"id": flow_run_id},
            json={"state": again.model_dump(mode="json", serialize_as_any=True), "force": True},
        )

    async def _watch_cancel(self, flow_run_id, cancelled: threading.Event) -> None:
        """Set `cancelled` when the flow run is cancelled (from the UI or the API)."""
        while not cancelled.is_set():
            try:
                state = (await self.client.read_flow_run(flow_run_id)).state
            except Exception:  # the API may blink; the next poll tries again
                state = None
            if state is not None and state.type in _CANCEL:
                cancelled.set()
                return
            await anyio.sleep(2)

    async def _cancel_requested(self, flow_run_id, cancelled: threading.Event) -> bool:
        """Whether the run is being cancelled, asking the API now (sets `cancelled` if so)."""
        if not cancelled.is_set():
            try:
                state = (await self.client.read_flow_run(flow_run_id)).state
            except Exception:  # noqa: BLE001 - the API blinked: the cancel watch still runs
                state = None
            if state is not None and state.type in _CANCEL:
                cancelled.set()
        return cancelled.is_set()

    async def _end_cancelled(self, flow_run_id, message: str) -> None:
        state = (await self.client.read_flow_run(flow_run_id)).state
        if state is None or state.type not in _FINAL:
            await self.client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: MigDockerJobConfiguration, grace_seconds: int = 30) -> None:
        """Stop a flow run's container (``infrastructure_pid`` is ``<engine url>:<container id>``)
        and release its lease (read from the container's labels)."""
        import docker.errors
        from prefect.exceptions import InfrastructureNotFound

        from prefect_mig.launchers.docker import LABEL_PREFIX, remove_container

        docker_url, container_id = _engine_and_container(infrastructure_pid)
        runner = configuration.runner()
        launcher = runner._launcher(docker_url)

        def kill() -> None:
            try:
                container = launcher.client.containers.get(container_id)
            except docker.errors.NotFound as exc:
                raise InfrastructureNotFound(f"container {container_id} of this flow run is gone") from exc
            container.stop(timeout=grace_seconds)
            if not remove_container(container):  # unconfirmed: the lease lapses instead (`Lease.abandon`)
                return
            lease_id, fence = container.labels.get(f"{LABEL_PREFIX}lease-id"), container.labels.get(f"{LABEL_PREFIX}fence")
            if lease_id and fence:
                runner._allocator().release(lease_id, int(fence))

        await anyio.to_thread.run_sync(kill)


def _infrastructure_pid(launcher, container) -> str:
    """A flow run's ``infrastructure_pid``: ``<engine url>:<container id>``, with the URL the
    launcher was given (docker-py's own ``base_url`` reads ``http+docker://localhost`` for every
    unix socket, so a second or rootless engine's runs were looked for on the machine's engine)."""
    return f"{launcher.engine_url}:{container.id}"


def _engine_and_container(infrastructure_pid: str) -> tuple[str | None, str]:
    """The Docker engine URL and container id of an ``infrastructure_pid`` (``<engine url>:<id>``;
    a pid of an earlier version names any unix socket ``http+docker://localhost``: the default one)."""
    base_url, _, container_id = infrastructure_pid.rpartition(":")
    return base_url.replace("http+docker://localhost", "unix:///var/run/docker.sock") or None, container_id


def _container_gone(infrastructure_pid: str, runner=None) -> str | None:
    """How a flow run's container is gone (``is gone``, ``exited with code N``), or None while it
    runs or its engine does not answer (then nothing can be said). The engine is reached as
    `runner`'s launchers reach it (a default `MigTaskRunner`'s: the settings' TLS certificates)."""
    import docker.errors
    import requests.exceptions

    from prefect_mig.errors import DockerUnavailable
    from prefect_mig.integrations.prefect.runner import MigTaskRunner
    from prefect_mig.launchers.docker import remove_container

    docker_url, container_id = _engine_and_container(infrastructure_pid)
    try:
        client = (runner or MigTaskRunner())._new_launcher(docker_url).client
    except DockerUnavailable:
        return None
    try:
        container = client.containers.get(container_id)
        if container.status in ("created", "running", "restarting", "paused"):
            return None
        code = container.attrs.get("State", {}).get("ExitCode")
        remove_container(container)
        return f"exited with code {code}"
    except docker.errors.NotFound:
        return "is gone"
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return None
    finally:
        client.close()


def _start_container(launcher, command: str | None, env: dict, labels: dict, mig_uuid: str, network: str | None,
                     working_dir: str | None, lease: Lease, lost: threading.Event):
    """Create the flow run's container on the launcher's engine, bound to `mig_uuid`, and start it
    unless `lease` is lost or its renewal between the create and the start fails (`start_confirmed`)."""
    import docker.errors

    from prefect_mig.errors import DockerUnavailable
    from prefect_mig.launchers.docker import confinement_options, remove_container, slice_bound_options, start_confirmed

    s = launcher.settings
    launcher.client  # noqa: B018 - a clear DockerUnavailable before anything else
    try:
        launcher.client.images.get(s.image)
    except docker.errors.ImageNotFound:
        launcher._image()  # raises ImageNotFound with what to do
    # a read-only root leaves /tmp writable: Prefect's home (profiles, local results) and HOME go there
    writable = {"HOME": "/tmp", "PREFECT_HOME": "/tmp/.prefect"} if s.read_only_root else {}
    create: dict[str, Any] = {
        "command": shlex.split(command or "prefect flow-run execute"),
        "environment": {**writable, **s.env, **env},
        "labels": labels,
        "detach": True,
    }
    if working_dir:
        create["working_dir"] = working_dir
    if network in (None, "none"):
        create["network_disabled"] = True
    elif network == "host":
        create["network_mode"] = "host"
    else:
        create["network"] = network
    create.update(slice_bound_options(s, mig_uuid))
    create.update(confinement_options(s))
    container = launcher.client.containers.create(s.image, **create)
    try:
        start_confirmed(container, lost, lease.confirm)  # renews the lease after the create
    except BaseException as exc:
        if not remove_container(container):
            raise DockerUnavailable(
                f"the Docker engine at {launcher.engine_url} stopped answering while the flow run's "
                f"container started ({exc.__class__.__name__}).", image=s.image, unconfirmed=True,
            ) from exc
        raise
    return container


def _start_failure(exc: Exception, image: str, node: str):  # noqa: ANN202
    """The final state and message of a run whose container could not start: Failed naming the
    job variable when the image is missing or has no ``prefect`` command, Crashed otherwise."""
    from prefect_mig.errors import ImageNotFound

    if isinstance(exc, ImageNotFound):
        return Failed, f"job variable image={image!r}: {exc}"
    if "executable file not found" in str(exc):
        return Failed, (f"job variable image={image!r} cannot run the flow run: {exc}. The image needs Prefect and "
                        "the flow's code (`prefect-mig image build` makes one).")
    return Crashed, f"could not run the flow run's container on {node}: {exc}"


def _wait_container(container, cancelled: threading.Event, lost: threading.Event, engine: str) -> int:
    """The container's exit code; a cancelled run's container gets SIGTERM (then SIGKILL after
    10 s), a lost lease's is killed at once. `engine`: the engine's URL, for the error (docker-py's
    ``base_url`` reads ``http+docker://localhost`` for every unix socket)."""
    import docker.errors

    from prefect_mig.errors import DockerUnavailable
    from prefect_mig.launchers.docker import _ENGINE_GONE, DockerLauncher, wait_for_exit

    try:
        exit_code = wait_for_exit(container, stop=(cancelled, lost), poll_s=1, engine_gone_s=DockerLauncher.ENGINE_GONE_S)
    except docker.errors.NotFound:  # removed under us: the node agent fenced it
        lost.set()
        return -1
    except _ENGINE_GONE as exc:
        raise DockerUnavailable(
            f"the Docker engine at {engine} stopped answering while the flow run's "
            f"container ran ({exc.__class__.__name__}); the run ends, and its lease lapses unless the container's "
            "removal is confirmed.", unconfirmed=True
        ) from exc
    if exit_code is not None:
        return exit_code
    try:
        container.stop(timeout=0 if lost.is_set() else 10)
    except docker.errors.NotFound:
        pass
    return -1


