"""The exceptions prefect-mig raises, and only those.

Every message says what happened and what to do next. Exceptions carry the fields a caller needs
to act on them (the field name and value that was refused, the GPU UUID, the profile).

```
PrefectMigError
├── ConfigError                 settings or a spec that cannot be used (also a ValueError)
│   ├── UnknownGpuModel         a GPU model name the catalog does not know
│   ├── UnknownProfile          a MIG profile name the GPU model does not offer
│   ├── InvalidProfileName      a string that is not a MIG profile name at all
│   ├── InvalidRequirement      a slice requirement that no profile could ever satisfy, or malformed
│   ├── InvalidLayout           a set of GPU instances that cannot coexist on one GPU
│   └── InvalidFleetSpec        a simulated fleet spec that does not parse
├── AllocationError             the lease allocator could not do what was asked
│   ├── NoCapacity              nothing fits now and the caller would not wait
│   ├── Unsatisfiable           no GPU in the inventory offers what the request accepts
│   ├── WaitTimeout             the wait for a slice ran out; the request was withdrawn
│   ├── LeaseNotOwned           renew/release with a fencing token that is not the lease's
│   ├── LeaseLost               the lease is gone: expired, revoked (preempted) or never granted
│   └── RedisUnavailable        Redis did not answer within the timeout
├── LaunchError                 a task container could not run the body to an outcome
│   ├── DockerUnavailable       the Docker engine does not answer
│   ├── ImageNotFound           the image is not on that engine (no registry is pulled from)
│   ├── ImagePythonMismatch     the image's Python minor version differs from the flow's
│   ├── ContainerFailed         the container ended without writing an outcome
│   └── ContainerStopped        the container was stopped: timeout, cancellation or a lost lease
└── BackendError                the GPU backend (NVML, real or simulated) refused or failed
    ├── NvmlUnavailable         no NVML library / driver, or the GPU index does not exist
    ├── MigDisabled             MIG mode is off on the GPU
    ├── ProfileNotSupported     the GPU does not offer that GPU-instance profile
    ├── PlacementConflict       the placement overlaps an existing instance or is not allowed
    ├── InstanceBusy            the instance has processes (or compute instances) and cannot go
    ├── InstanceNotFound        no GPU instance with that id on the GPU
    └── NoPermission            creating/destroying instances needs root or the MIG capability
NodeTaken                       another node agent, alive, already serves this node or its GPUs
NodeClaimLapsed                 this node agent could not renew its claim on the node for a whole TTL
AgentStopped                    a node agent was stopped before its first claim and round were done
NodeInUse                       a node to forget is claimed by an agent, holds a lease or awaits a fence
GpuHeld                         another process of this host (an agent, the demo) serves the GPU
GpuLockUntrusted                a GPU lock file or its directory is one another user could tamper with
```

Foreign errors (pynvml's `NVMLError_*`) are translated at the backend edge with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable


def _allowed(names: Iterable[str]) -> str:
    return ", ".join(names)


class PrefectMigError(Exception):
    """Base class of every error prefect-mig raises on purpose."""


# --------------------------------------------------------------------------- configuration / specs


class ConfigError(PrefectMigError, ValueError):
    """A setting, a spec or an argument cannot be used.

    Attributes:
        field: the name of the field or argument that was refused (``None`` when not one field).
        value: the value that was refused.
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class UnknownGpuModel(ConfigError):
    """A GPU model name the catalog does not know."""

    def __init__(self, name: str, known: Iterable[str], *, field: str = "gpu_model") -> None:
        self.known = tuple(known)
        super().__init__(
            f"{field}: unknown GPU model {name!r}. Known models: {_allowed(self.known)}.",
            field=field,
            value=name,
        )


class UnknownProfile(ConfigError):
    """A MIG profile name that the GPU model does not offer."""

    def __init__(
        self, name: str, gpu_model: str, known: Iterable[str], *, field: str = "profile"
    ) -> None:
        self.gpu_model = gpu_model
        self.known = tuple(known)
        super().__init__(
            f"{field}: {gpu_model} has no MIG profile {name!r}. "
            f"Profiles on {gpu_model}: {_allowed(self.known)}.",
            field=field,
            value=name,
        )


class InvalidProfileName(ConfigError):
    """A string that is not shaped like a MIG profile name (``<C>g.<M>gb[+me]``)."""

    def __init__(self, name: object, *, field: str = "profile") -> None:
        super().__init__(
            f"{field}: {name!r} is not a MIG profile name. Expected '<compute>g.<memory>gb' with an "
            "optional media suffix, for example '1g.10gb', '3g.40gb' or '1g.10gb+me'.",
            field=field,
            value=name,
        )


class InvalidRequirement(ConfigError):
    """A slice requirement that is malformed or that no profile of a model could satisfy."""


class InvalidLayout(ConfigError):
    """GPU instances that cannot coexist on one GPU (overlap, bad start, too many, two ``+me``)."""


class InvalidFleetSpec(ConfigError):
    """A simulated fleet spec such as ``node-a=2xH100-80GB,node-b=1xA30-24GB`` that does not parse."""


# --------------------------------------------------------------------------- allocator


class AllocationError(PrefectMigError):
    """The lease allocator could not do what was asked.

    Attributes:
        lease_id: the lease or request concerned, when there is one.
    """

    def __init__(self, message: str, *, lease_id: str | None = None) -> None:
        super().__init__(message)
        self.lease_id = lease_id


class NoCapacity(AllocationError):
    """Nothing fits now (all matching slices leased, or the tenant's quota is used up)."""

    def __init__(self, message: str, *, reason: str, **kw) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class Unsatisfiable(AllocationError):
    """No GPU in the inventory offers a slice the request accepts, so waiting would never end.

    Attributes:
        offered: the kinds of slices the inventory has (``H100-80GB/1g.10gb``).
        field, value: the request's field and value no GPU can meet (``gpu_model``), when it is one.
    """

    def __init__(self, message: str, *, offered: list[str], field: str | None = None, value: object = None, **kw) -> None:
        super().__init__(message, **kw)
        self.offered = offered
        self.field = field
        self.value = value


class WaitTimeout(AllocationError):
    """The wait for a slice ran out; the request was withdrawn from the queue."""


class LeaseNotOwned(AllocationError):
    """Renew or release with a fencing token that is not the lease's current one."""


class LeaseLost(AllocationError):
    """The lease ended without its holder releasing it: expired, revoked (preempted) or unknown.

    Attributes:
        reason: ``expired``, ``revoked`` or ``gone``.
    """

    def __init__(self, message: str, *, reason: str, **kw) -> None:
        super().__init__(message, **kw)
        self.reason = reason


class RedisUnavailable(AllocationError):
    """Redis did not answer (down, unreachable or too slow)."""


# --------------------------------------------------------------------------- launcher


class LaunchError(PrefectMigError):
    """A task container could not run the body to an outcome.

    Attributes:
        image: the image concerned.
        container_id: the container, when one was created (it has been removed).
    """

    def __init__(self, message: str, *, image: str | None = None, container_id: str | None = None) -> None:
        super().__init__(message)
        self.image = image
        self.container_id = container_id


class DockerUnavailable(LaunchError):
    """The Docker engine does not answer.

    Attributes:
        unconfirmed: the task container may still run (the engine stopped answering before its
            end could be seen or its removal confirmed): its lease must lapse, not be released.
    """

    def __init__(self, message: str, *, unconfirmed: bool = False, **kw) -> None:
        super().__init__(message, **kw)
        self.unconfirmed = unconfirmed


class ImageNotFound(LaunchError):
    """The image is not on the engine that owns the slice."""


class ImagePythonMismatch(LaunchError):
    """The image's Python minor version differs from the flow's, so cloudpickle cannot be trusted."""


class ContainerFailed(LaunchError):
    """The container ended without writing an outcome (killed, out of memory, no python3...);
    `oom_killed` when the kernel killed it for going over its memory limit."""

    def __init__(self, message: str, *, exit_code: int | None = None, output: str = "", oom_killed: bool = False,
                 **kw) -> None:
        super().__init__(message, **kw)
        self.exit_code = exit_code
        self.output = output
        self.oom_killed = oom_killed


class ContainerStopped(LaunchError):
    """The container was stopped before the body finished (timeout, cancellation, lost lease)."""


class TryCancelled(ContainerStopped):
    """The flow run was cancelled: this task try's wait for a slice was withdrawn or its container
    stopped, and its lease released. The task run then ends Cancelled, not Failed."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised inside a task container (set as ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n--- raised in the task container ---\n" + self.tb


class TaskBodyError(PrefectMigError):
    """The task body raised an exception whose type cannot be rebuilt in the flow's process (not
    picklable, or defined only in the image); the message names the type and says what it said.

    Attributes:
        type_name: the original exception's ``module.QualName``.
        original_message: its ``str()``.
        traceback: the container's traceback text.
    """

    def __init__(self, message: str, *, type_name: str = "", original_message: str = "", traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.original_message = original_message
        self.traceback = traceback


class ImageWithoutPython(LaunchError):
    """The image has no ``python3`` on its PATH, so no task body can run in it."""


# --------------------------------------------------------------------------- GPU backend


class BackendError(PrefectMigError):
    """The GPU backend (NVML, real or simulated) refused an operation or failed.

    Attributes:
        gpu_uuid: the GPU the operation was about, when known.
        nvml_code: the NVML return code behind the error, when there was one.
    """

    def __init__(
        self, message: str, *, gpu_uuid: str | None = None, nvml_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.gpu_uuid = gpu_uuid
        self.nvml_code = nvml_code


class NvmlUnavailable(BackendError):
    """NVML cannot be used: no driver or library, or the device does not exist."""


class MigDisabled(BackendError):
    """MIG mode is off on the GPU; prefect-mig never switches it on by itself."""


class ProfileNotSupported(BackendError):
    """The GPU does not offer that GPU-instance profile."""

    def __init__(self, message: str, *, profile: str | int, **kw) -> None:
        super().__init__(message, **kw)
        self.profile = profile


class PlacementConflict(BackendError):
    """The requested placement overlaps an existing instance or is not a valid start."""

    def __init__(self, message: str, *, profile: str, start: int, **kw) -> None:
        super().__init__(message, **kw)
        self.profile = profile
        self.start = start


class InstanceBusy(BackendError):
    """The instance still has processes or compute instances, so it cannot be destroyed."""

    def __init__(self, message: str, *, gpu_instance_id: int, **kw) -> None:
        super().__init__(message, **kw)
        self.gpu_instance_id = gpu_instance_id


class InstanceNotFound(BackendError):
    """No GPU instance with that id exists on the GPU (any more)."""

    def __init__(self, message: str, *, gpu_instance_id: int, **kw) -> None:
        super().__init__(message, **kw)
        self.gpu_instance_id = gpu_instance_id


class NoPermission(BackendError):
    """The process may not change MIG instances (needs root or the MIG config capability)."""


class LayoutNotApplied(BackendError):
    """Changing a GPU's layout failed half-way; what was changed was undone where possible.

    Attributes:
        cause: the error that stopped the change (e.g. `InstanceBusy`).
        destroyed / created: placements (``3g.40gb@4``) destroyed and created before it stopped.
        rolled_back: every destroyed instance is back (with a new MIG UUID) and every created one gone.
        rollback_error: what went wrong while undoing, if anything did (the cause still comes first).
    """

    def __init__(
        self,
        message: str,
        *,
        cause: BackendError,
        destroyed: list[str],
        created: list[str],
        rolled_back: bool,
        rollback_error: str | None = None,
        **kw,
    ) -> None:
        super().__init__(message, **kw)
        self.cause = cause
        self.destroyed = destroyed
        self.created = created
        self.rolled_back = rolled_back
        self.rollback_error = rollback_error


class NotInHostPidNamespace(PrefectMigError):
    """This process cannot see the host's processes, so it must not decide whether a slice is busy.

    Attributes:
        detail: the namespace found (``pid:[4026532252] is not the host's PID namespace``).
    """

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class NodeTaken(PrefectMigError):
    """Another node agent, alive, already serves this node, or one of its GPUs under another node
    name: two would apply the same GPU's layout changes at once (destroying leased slices) and
    publish over each other.

    Attributes:
        node: this agent's node name.
        namespace: the cluster's namespace.
        what: what the other agent holds, ``node <name>`` or ``GPU <uuid>``.
        serving: the node name the other agent serves.
        host: the host it runs on (its ``socket.gethostname()``).
        pid: its process id on that host.
    """

    def __init__(self, *, node: str, namespace: str, what: str, serving: str, host: str, pid: int, ttl_s: float) -> None:
        also = "" if serving == node else f" as node {serving}"
        super().__init__(
            f"{what} in namespace {namespace} already has a live agent{also}: pid {pid} on host {host}. Run one "
            f"agent per node and per GPU: stop that one, or give this one its own PREFECT_MIG_NODE (a renamed "
            f"node: stop the agent of its old name). A dead agent's claim lapses {ttl_s:g} s after its last tick "
            f"(at once for one that died on this host)."
        )
        self.node = node
        self.namespace = namespace
        self.what = what
        self.serving = serving
        self.host = host
        self.pid = pid


class GpuHeld(PrefectMigError):
    """Another live process of this host serves the GPU (holds its lock file, see
    `prefect_mig.gpu.host_lock`): a node agent or the demo of another cluster (namespace, Redis) or
    state dir. Both would carve the GPU, and a re-carve of one destroys a slice the other leased.

    Attributes:
        gpu: the GPU's UUID.
        pid: the holder's process id (None when it wrote none).
        what: what the holder is (``prefect-mig agent``, ``prefect-mig demo``).
        about: what else it wrote of itself (namespace, node, state dir).
        path: the lock file.
    """

    def __init__(self, *, gpu: str, pid: int | None, what: str, about: dict, path: str) -> None:
        said = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(about.items()) if v not in (None, ""))
        holder = f"{what} (pid {pid}{', ' + said if said else ''})" if pid else f"{what} (pid unknown)"
        state_dir = about.get("state_dir")
        down = (f"; a local cluster's agent: `prefect-mig down` with PREFECT_MIG_STATE_DIR={state_dir}"
                if state_dir and "agent" in what else "")
        stop = f"`kill {pid}` (it gives the GPU back as it stops{down})" if pid else f"the process holding {path}"
        super().__init__(
            f"GPU {gpu} is served by another process on this host: {holder}. Two processes carving one GPU "
            f"destroy each other's leased slices, so run one agent (or demo) per GPU: stop that one first, {stop}, "
            f"or use that one's cluster (lock file {path})."
        )
        self.gpu, self.pid, self.what, self.about, self.path = gpu, pid, what, about, path


class GpuLockUntrusted(PrefectMigError):
    """A GPU lock file or its directory (see `prefect_mig.gpu.host_lock`) is one another user could
    tamper with: a symbolic link (a root agent would write where it points), a hard link, a device
    or FIFO, a directory of another user, or one others may write without the sticky bit (a held lock
    file removed, a second process locks a new one). The process locks nothing there and refuses.

    Attributes:
        path: the file or directory.
        why: what is wrong with it.
        owner: its owner (user name and uid).
    """

    def __init__(self, *, path: str, why: str, owner: str) -> None:
        super().__init__(
            f"GPU lock {path} is not trusted: {why}, owned by {owner}. Another user could use it to keep this "
            f"host's agents off their GPUs or to make this process write where it should not, so nothing was "
            f"locked or carved. Remove it as root (`rm -r {path}`) if no agent of this host made it, or set "
            f"PREFECT_MIG_GPU_LOCK_DIR to a directory only the agents' users can write."
        )
        self.path, self.why, self.owner = path, why, owner


class NodeNotClaimed(PrefectMigError):
    """A node agent's write for its node (a publish, a heartbeat, a withdrawal or restore of slices,
    a settle of fenced slices, the clear of a desired layout it is done with) reached Redis when the
    node's claim was no longer its own (its claim lapsed while the write was delayed, and maybe
    another agent serves the node now), so it was refused: a publish read before another agent
    re-carved the GPU would bring back slices that no longer exist, a restore would put back into
    service slices that agent withdrew to destroy. The agent's next round claims the node again.

    Attributes:
        node: the agent's node name.
        holder: the identity of the agent that claims the node now (JSON), or None when none does.
        action: what was refused, e.g. ``publish the inventory of node node-a``.
    """

    def __init__(self, *, node: str, holder: str | None, action: str = "publish the inventory") -> None:
        who = f"another agent claims it now ({holder})" if holder else "no agent claims it now"
        super().__init__(
            f"node {node}: this agent's write was refused ({action}), because its claim on the node had lapsed when "
            f"it reached Redis ({who}). Its next round claims the node again and publishes what NVML shows."
        )
        self.node = node
        self.holder = holder
        self.action = action


class NodeInUse(PrefectMigError):
    """A node cannot be forgotten (``prefect-mig node forget``) while something holds it.

    Attributes:
        node: the node's name.
        holds: what holds it, in words: an agent's claim, leases, slices awaiting fencing.
        leased: what holds it are live leases (`--host-is-gone` does not help).
        fencing: what holds it are slices awaiting the fencing of an expired holder's task
            container, which ``node forget --host-is-gone`` drops.
    """

    def __init__(self, *, node: str, holds: list[str], leased: bool = False, fencing: bool = False) -> None:
        if leased:
            todo = (f"A live lease blocks it even with --host-is-gone, since its holder may still use the slice: wait "
                    f"until it expires (a holder whose host is gone stops renewing), or take it back with `prefect-mig "
                    f"lease revoke LEASE_ID` (`prefect-mig node drain {node} --wait` waits for them), then try again.")
        elif fencing:
            todo = (f"Nobody fences them while no agent serves the node: start its agent (its first round fences and "
                    f"settles them), or, if its host is gone for good, `prefect-mig node forget {node} --host-is-gone` "
                    f"drops them; should the node ever publish again, each of its slices then stays quarantined until "
                    f"its agent has removed any old task container, so none is granted while one may still run.")
        else:
            todo = (f"Stop its agent (its claim is given back, or lapses after its heartbeat TTL) and let its leases "
                    f"end (`prefect-mig node drain {node} --wait`), then try again.")
        super().__init__(f"node {node} cannot be forgotten: {'; '.join(holds)}. {todo}")
        self.node = node
        self.holds = holds
        self.leased = leased
        self.fencing = fencing


class NodeClaimLapsed(PrefectMigError):
    """A node agent's claim on its node (see `NodeTaken`) was last confirmed a whole heartbeat TTL
    ago (Redis did not answer, or the process was frozen), so another agent may hold the node now:
    the agent changes nothing on the node (no carve, no release, no publish) until it claims it again.

    Attributes:
        node: the agent's node name.
        age_s: seconds since the claim was last confirmed.
        ttl_s: the claim's TTL.
    """

    def __init__(self, *, node: str, age_s: float, ttl_s: float) -> None:
        super().__init__(
            f"node {node}: this agent's claim on it was last confirmed {age_s:.1f} s ago, past its {ttl_s:g} s TTL "
            f"(Redis did not answer, or the process was frozen), so another agent may serve the node now. It changes "
            f"nothing there until it has claimed the node again (its next round tries); check that Redis answers."
        )
        self.node = node
        self.age_s = age_s
        self.ttl_s = ttl_s


class AgentStopped(PrefectMigError):
    """A node agent was stopped (`NodeAgent.stop`) before its first round (`NodeAgent.start`), or
    while that round or its first claim (`NodeAgent.serving` waiting for Redis) waited to try again:
    it changes nothing more on the node, and its claim, if it held one, was given back.

    Attributes:
        node: the agent's node name.
    """

    def __init__(self, *, node: str) -> None:
        super().__init__(f"node {node}: the agent was stopped (NodeAgent.stop) before it had claimed the node and "
                         "finished its first round; it changes nothing more on the node")
        self.node = node
