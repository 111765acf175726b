"""``@mig(work_pool=..., profile=...)``: a flow bound to a ``mig-docker`` work pool, like
prefect-docker's ``@docker(work_pool=...)`` (Prefect's infrastructure-bound flows): calling it
submits a run to the pool's infrastructure (a leased slice and a container, see
`MigDockerWorker`) and returns its result.

Prefect ships the flow to the container as a bundle, so the pool needs bundle storage and result
storage both sides can read: ``prefect work-pool storage configure s3|gcs|azure``, or a shared
directory (`prefect_mig.integrations.prefect.bundle_dir.use_directory_storage`) mounted into the
containers at the same path.

Examples:
    ```python
    from prefect import flow
    from prefect_mig import mig

    @mig(work_pool="mig-gpu", profile="1g.10gb", priority=5, image="prefect-mig-flow:latest")
    @flow
    def train(epochs: int) -> str:
        import os
        return os.environ["CUDA_VISIBLE_DEVICES"]

    assert train.work_pool == "mig-gpu" and train.job_variables["profile"] == "1g.10gb"
    ```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.flows import Flow, InfrastructureBoundFlow, bind_flow_to_infrastructure


#: how the flow-run container runs the bundle: the image's python3 with Prefect (no ``uv``, which
#: Prefect's default ``uv run`` launcher needs and the images here lack)
EXECUTION_LAUNCHER = {"execution": ["python3"]}


def mig(work_pool: str, *, launcher: Any = None, **job_variables: Any) -> Callable[[Flow], InfrastructureBoundFlow]:
    """Bind a flow to the ``mig-docker`` pool `work_pool`; `job_variables` override its base job
    template (profile, priority, tenant, preemptible, wait_timeout_s, image, volumes, network, cpus,
    mem_limit, env, container_options, lease_ttl_s). `launcher` is Prefect's bundle launcher
    override; by default the container runs the bundle with its ``python3``.

    Raises:
        ConfigError: an unknown job variable (naming it and those allowed).
    """
    from prefect_mig.errors import ConfigError
    from prefect_mig.integrations.prefect.worker import MigDockerVariables, MigDockerWorker

    allowed = set(MigDockerVariables.model_fields)
    for name in job_variables:
        if name not in allowed:
            raise ConfigError(f"@mig job variable {name!r} is not one of {', '.join(sorted(allowed))}.", field=name)

    def bind(flow: Flow) -> InfrastructureBoundFlow:
        return bind_flow_to_infrastructure(flow, work_pool, MigDockerWorker, job_variables=job_variables,
                                           launcher=launcher or EXECUTION_LAUNCHER)

    return bind
