"""The ``mig-cluster`` block: where a cluster's leases live and how its containers are made.

Register it so that it appears in the Prefect UI with a form built from its fields::

    prefect block register -m prefect_mig.blocks

``blocks/create_defaults.py`` creates a default block document from ``PREFECT_MIG_*`` settings.
"""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


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
from prefect_mig import MigTaskRunner, task
from prefect_mig.blocks import MigCluster

cluster = MigCluster.load("BLOCK_NAME")

@task(task_runner=MigTaskRunner(profile="1g.10gb", cluster=cluster))
def infer(batch):
    ...
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
