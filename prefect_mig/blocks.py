"""The ``mig-cluster`` block: where a cluster's leases live and how its containers are made.

Register it so that it appears in the Prefect UI with a form built from its fields::

    prefect block register -m prefect_mig.blocks

``blocks/create_defaults.py`` creates a default block document from ``PREFECT_MIG_*`` settings.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError

from prefect_mig.errors import ConfigError


class MigCluster(Block):
    """A MIG cluster: its Redis (the lease store), namespace, default image and lease settings.

    Examples:
        Use a saved cluster for a task:
        ```python
        from prefect_mig import MigTaskRunner, task
        from prefect_mig.blocks import MigCluster

        cluster = MigCluster(redis_url="redis://127.0.0.1:6379/0", namespace="prod")
        runner = MigTaskRunner(profile="1g.10gb", cluster=cluster)
        assert runner.cluster.namespace == "prod"
        ```

        Lease a slice for work outside a container (``async with`` works too), and see the cluster:
        ```python
        import subprocess
        from prefect_mig.blocks import MigCluster
        from prefect_mig.testing.redis_server import RedisServer

        with RedisServer() as server:
            cluster = MigCluster(redis_url=server.url, namespace="doc-block")
            cluster.lease_client().allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
            with cluster.lease("4g.24gb", priority=5, tenant="team-a") as lease:
                env = {"CUDA_VISIBLE_DEVICES": lease.mig_uuid}
                subprocess.run(["true"], env=env, check=True)
                assert len(cluster.status()["leases"]) == 1
            assert cluster.status()["leases"] == []
        ```
    """

    _block_type_name = "MIG Cluster"
    _block_type_slug = "mig-cluster"
    _logo_url = "https://images.ctfassets.net/gm98wzqotmnx/4nGlDhE3Hd9kE2lVSPHvBe/9b6a4a5e15c13bd2e2f6c9e0d4c3b4c5/gpu.png"  # noqa: E501
    _description = (
        "A cluster of NVIDIA GPUs partitioned with MIG, shared through prefect-mig leases: the Redis "
        "that holds the leases, the namespace, and how task containers are made."
    )
    _documentation_url = "https://github.com/prefect-mig/prefect-mig#readme"
    _code_example = """
```python
import os
import subprocess

from prefect_mig import MigTaskRunner, task
from prefect_mig.blocks import MigCluster

cluster = MigCluster.load("BLOCK_NAME")

@task(task_runner=MigTaskRunner(profile="1g.10gb", cluster=cluster))
def infer(batch):
    ...

# work outside a container: a subprocess given the slice (renewed, released on exit)
with cluster.lease("1g.10gb", priority=5, tenant="team-a") as lease:
    subprocess.run(["python", "train.py"], env={**os.environ, "CUDA_VISIBLE_DEVICES": lease.mig_uuid})

print(cluster.status()["leases"])
```
"""

    redis_url: SecretStr = Field(
        default=..., description="Redis URL of the lease store, e.g. redis://redis.internal:6379/0."
    )
    namespace: str = Field(
        default="default",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Namespace of this cluster's keys inside Redis.",
    )
    image: str = Field(
        default="prefect-mig-python:bookworm",
        description="Default image for task containers; its Python minor version must match the flow's.",
    )
    default_priority: int = Field(default=0, ge=0, le=100, description="Priority of tasks that set none (0 to 100).")
    lease_ttl_s: float = Field(default=60.0, ge=1, le=86_400, description="Lease time to live in seconds, renewed every third.")
    docker_host: str | None = Field(
        default=None, description="Docker engine URL when a node publishes none; unset uses the local engine."
    )
    gpu_runtime: Literal["nvidia", "none"] = Field(
        default="nvidia", description="'nvidia' binds containers to the MIG device; 'none' only sets the environment."
    )
    docker_tls_ca: SecretStr | None = Field(
        default=None,
        description="PEM of the CA that signed the certificates of node engines on tcp:// with --tlsverify.",
    )
    docker_tls_cert: SecretStr | None = Field(
        default=None, description="PEM of the Docker client certificate runners present (signed by that CA)."
    )
    docker_tls_key: SecretStr | None = Field(default=None, description="PEM of the key of that client certificate.")
    container_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Task containers' confinement, loosened for bodies that need it: read_only_root, tmp_size, "
        "no_new_privileges, cap_add, pids_limit, user (empty: read-only root, no capabilities, 4096 processes).",
    )

    def docker_tls(self):
        """The block's Docker client certificates as files docker can read (`DockerTls`), or None."""
        from prefect_mig.launchers.engines import docker_tls_from_pem

        secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
        return docker_tls_from_pem(ca=secret(self.docker_tls_ca), cert=secret(self.docker_tls_cert), key=secret(self.docker_tls_key))

    def lease_client(self):
        """A `LeaseClient` on this cluster's Redis and namespace."""
        from prefect_mig.allocator import LeaseClient

        return LeaseClient(self.redis_url.get_secret_value(), self.namespace)

    def lease(
        self,
        profile: str,
        *,
        priority: int | None = None,
        tenant: str = "default",
        preemptible: bool = False,
        timeout_s: float | None = None,
        holder: str = "",
    ) -> _BlockLease:
        """Lease a slice (``1g.10gb`` or minimums such as ``>=20gb``) for the body of a ``with`` or
        ``async with``: renewed every third of `lease_ttl_s` while it runs, released on every exit.
        The `Lease` it yields has ``mig_uuid`` to hand to a subprocess (``CUDA_VISIBLE_DEVICES``).

        Raises:
            ConfigError: a bad profile, priority or tenant (naming it); WaitTimeout after `timeout_s`.
        """
        from prefect_mig.allocator import SliceRequest
        from prefect_mig.model import SliceRequirement

        need = SliceRequirement.parse(profile, field="profile")
        try:
            request = SliceRequest(
                **need.model_dump(exclude_none=True),
                priority=self.default_priority if priority is None else priority,
                tenant=tenant, preemptible=preemptible, ttl_s=self.lease_ttl_s, holder=holder[:256],
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            raise ConfigError(
                f"MigCluster.lease {field}={first.get('input')!r}: {first['msg'].removeprefix('Value error, ')}",
                field=field, value=first.get("input"),
            ) from exc
        return _BlockLease(self, request, timeout_s)

    def status(self) -> dict[str, Any]:
        """The cluster now: nodes, slices with their state and lease, leases, and the queue."""
        return self.lease_client().allocator.status()


class _BlockLease:
    """The context manager `MigCluster.lease` returns: ``with`` or ``async with``."""

    def __init__(self, cluster: MigCluster, request, timeout_s: float | None) -> None:
        self.cluster, self.request, self.timeout_s = cluster, request, timeout_s
        self._context: Any = None

    def __enter__(self):
        self._context = self.cluster.lease_client().lease(self.request, timeout_s=self.timeout_s)
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    async def __aenter__(self):
        from prefect_mig.allocator import AsyncLeaseClient

        client = AsyncLeaseClient(self.cluster.redis_url.get_secret_value(), self.cluster.namespace)
        self._context = client.lease(self.request, timeout_s=self.timeout_s)
        return await self._context.__aenter__()

    async def __aexit__(self, *exc):
        return await self._context.__aexit__(*exc)
