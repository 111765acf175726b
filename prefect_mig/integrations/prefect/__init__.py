"""Prefect integration: `task`, `MigTaskRunner`, the `AwaitingMIG` state and the `MigCluster` block."""

from prefect_mig.integrations.prefect.runner import AWAITING_MIG, MigTaskRunner
from prefect_mig.integrations.prefect.task import task

__all__ = ["AWAITING_MIG", "MigTaskRunner", "task"]
