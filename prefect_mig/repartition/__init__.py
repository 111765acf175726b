"""Repartitioning: a pure planner today; the service that applies plans comes with issue 5."""

from prefect_mig.repartition.planner import DemandBook, GpuPlan, GpuState, Knobs, plan, plan_gpu

__all__ = ["DemandBook", "GpuPlan", "GpuState", "Knobs", "plan", "plan_gpu"]
