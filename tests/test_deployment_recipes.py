"""The repository's ``prefect.yaml`` deploys what the README says, and the repartition deployment's
trigger does not fire on the repartition flow's own runs (it did: 8 runs in 95 s)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def _flow_name(entrypoint: str) -> str:
    """The ``@flow(name=...)`` of an entrypoint, read without importing it."""
    path, _, function = entrypoint.partition(":")
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    call = next(d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow")
    return next(k.value.value for k in call.keywords if k.arg == "name")


def test_prefect_yaml_has_a_mig_docker_and_a_process_deployment_of_real_flows():
    deployments = _deployments()
    assert deployments["on-a-slice"]["work_pool"]["job_variables"]["image"] == "prefect-mig-flow:latest"
    assert _flow_name(deployments["on-a-slice"]["entrypoint"]) == "train-on-a-slice"
    assert _flow_name(deployments["process"]["entrypoint"]) == "mig-demo-pipeline"
    assert _flow_name(deployments["mig-repartition"]["entrypoint"]) == "mig-repartition"


def test_the_repartition_trigger_fires_on_other_flows_runs_only():
    from prefect.server.events.schemas.events import RelatedResource, ResourceSpecification

    (trigger,) = _deployments()["mig-repartition"]["triggers"]
    related = ResourceSpecification(trigger["match_related"])

    def run_of(flow_name: str) -> list[RelatedResource]:
        return [
            RelatedResource({"prefect.resource.id": "prefect.flow.1", "prefect.resource.role": "flow",
                             "prefect.resource.name": flow_name}),
            RelatedResource({"prefect.resource.id": "prefect.deployment.2", "prefect.resource.role": "deployment",
                             "prefect.resource.name": "mig-repartition"}),
        ]

    assert not related.includes(run_of(_flow_name("flows/repartition.py:repartition")))
    assert related.includes(run_of("mig-demo-pipeline"))
    assert "--pool" in (ROOT / "flows" / "repartition.py").read_text().split('"""')[1]
