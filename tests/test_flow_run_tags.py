"""Tags of a flow run (and so of its deployment: its runs carry its tags) reach its tasks: a
``mig-priority:`` / ``mig-tenant:`` / ``mig:`` tag on the run applies to each task that says
nothing itself; the task's tags and its runner's arguments win."""

from __future__ import annotations

import pytest

from prefect_mig import MigTaskRunner, task

pytestmark = [pytest.mark.docker, pytest.mark.redis]


def _device() -> str:
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_flow_run_tags_apply_to_tasks_that_set_nothing_themselves(cluster):
    from prefect import flow, get_client
    from prefect.flow_engine import run_flow

    plain = task(task_runner=MigTaskRunner(profile="1g.10gb"), name="plain")(_device)
    own_priority = task(task_runner=MigTaskRunner(profile="1g.10gb", priority=2), name="own-priority")(_device)
    own_tags = task(task_runner=MigTaskRunner(profile="1g.10gb"), tags=["mig-tenant:team-b"], name="own-tags")(_device)
    no_profile = task(task_runner=MigTaskRunner(), name="no-profile")(_device)

    @flow
    def pipeline():
        return [t() for t in (plain, own_priority, own_tags, no_profile)]

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(pipeline, tags=["mig-priority:7", "mig-tenant:team-a", "mig:3g.40gb"])
    devices = run_flow(pipeline, flow_run=run)
    assert all(d.startswith("MIG-") for d in devices)
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert [(e["priority"], e["tenant"], e["pkey"].split("/")[-1]) for e in granted] == [
        ("7", "team-a", "1g.10gb"), ("2", "team-a", "1g.10gb"), ("7", "team-b", "1g.10gb"), ("7", "team-a", "3g.40gb"),
    ]



@pytest.mark.parametrize("on", ["task", "flow run"])
@pytest.mark.parametrize(
    ("tag", "allowed"),
    [("mig-priority:high", "a priority from 0 to 100"), ("mig-priority:500", "a priority from 0 to 100"),
     ("mig-tenant:team a", "letters, digits"), ("mig:1g.10gbb", "neither a profile name")],
)
def test_a_bad_mig_tag_fails_the_task_naming_the_tag_and_what_is_allowed(cluster, on, tag, allowed):
    """On a plain Prefect task under a flow-level runner, or on the flow run (a `prefect_mig.task`'s
    own tags are refused when it is made). Found by a new-user trial: ``mig-priority:high`` failed
    with int()'s "invalid literal for int() with base 10", and ``mig-priority:500`` blamed
    ``MigTaskRunner priority=500``, an argument nobody gave."""
    import prefect
    from prefect import flow, get_client
    from prefect.flow_engine import run_flow

    from prefect_mig.errors import ConfigError

    if on == "task":
        tagged = prefect.task(tags=[tag] if tag.startswith("mig:") else [tag, "mig:1g.10gb"], name="tagged")(_device)
        runner = MigTaskRunner()
    else:
        tagged = task(task_runner=MigTaskRunner(profile="1g.10gb"), name="tagged")(_device)
        runner = None

    @flow(task_runner=runner) if runner else flow
    def pipeline():
        return tagged.submit().result()

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(pipeline, tags=[tag] if on == "flow run" else [])
    with pytest.raises(ConfigError) as refused:
        run_flow(pipeline, flow_run=run)
    said = str(refused.value)
    assert said.startswith("tags: ") and tag.split(":", 1)[1] in said and allowed in said, said
    assert "MigTaskRunner" not in said and refused.value.field == "tags", said
    assert cluster.status()["queue"] == [] and cluster.status()["leases"] == []
