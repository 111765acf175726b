"""``@mig(work_pool=..., ...)`` binds a flow to a mig-docker pool with its job variables, and
refuses a job variable the pool does not have (a typo would otherwise be dropped silently)."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.flows import InfrastructureBoundFlow

from prefect_mig import mig
from prefect_mig.errors import ConfigError
from prefect_mig.integrations.prefect.worker import MigDockerWorker


def test_mig_binds_the_flow_to_the_pool_with_its_job_variables():
    @mig(work_pool="mig-gpu", profile=">=20gb", priority=7, tenant="team-a", image="prefect-mig-flow:latest")
    @flow
    def train(epochs: int = 1) -> int:
        return epochs

    assert isinstance(train, InfrastructureBoundFlow)
    assert train.work_pool == "mig-gpu" and train.worker_cls is MigDockerWorker
    assert train.job_variables == {"profile": ">=20gb", "priority": 7, "tenant": "team-a", "image": "prefect-mig-flow:latest"}


def test_mig_refuses_an_unknown_job_variable_naming_it():
    with pytest.raises(ConfigError, match="'profle'") as caught:
        mig(work_pool="mig-gpu", profle="1g.10gb")
    assert caught.value.field == "profle"
