"""`prefect-mig quota set|clear|list`: an operator sets tenants' quotas without writing Python,
on a real redis-server, and the allocator enforces what the command wrote."""

from __future__ import annotations

import json

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.errors import NoCapacity

from .test_agent_and_lease_cli import _cli, cli_env  # noqa: F401 - cli_env is a fixture


@pytest.fixture
def fleet(redis_client, namespace) -> Allocator:
    allocator = Allocator(redis_client, namespace)
    allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3"]})
    return allocator


def one_g(tenant: str) -> SliceRequest:
    return SliceRequest(profile="1g.6gb", tenant=tenant, ttl_s=60)


def test_quota_set_limits_a_tenant_list_shows_its_use_and_clear_lifts_it(fleet, cli_env):
    set_ = _cli("quota", "set", "team-a", "--slices", "1", "--compute", "4", env=cli_env)
    assert set_.returncode == 0, set_.stderr
    assert "team-a" in set_.stdout and "1 slice" in set_.stdout
    held = fleet.try_acquire(one_g("team-a"))
    with pytest.raises(NoCapacity, match="quota"):
        fleet.try_acquire(one_g("team-a"))
    fleet.try_acquire(one_g("team-b"))  # other tenants are not limited
    listed = json.loads(_cli("quota", "list", "--json", env=cli_env).stdout)
    assert listed == [{"tenant": "team-a", "slices": 1, "compute": 4, "slices_held": 1, "compute_held": 1}]
    text = _cli("quota", "list", env=cli_env)
    assert text.returncode == 0 and "team-a" in text.stdout
    cleared = _cli("quota", "clear", "team-a", env=cli_env)
    assert cleared.returncode == 0, cleared.stderr
    fleet.try_acquire(one_g("team-a"))
    assert json.loads(_cli("quota", "list", "--json", env=cli_env).stdout) == []
    fleet.release(held.lease_id, held.fence)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["team-a", "--slices", "-1"], ["--slices", "-1", "0 or more"]),
        (["team-a", "--compute", "-2"], ["--compute", "-2", "0 or more"]),
        (["team-a", "--slices", "200000"], ["--slices", "200000", "at most 100,000"]),
        (["team-a"], ["--slices", "--compute", "at least one"]),
        (["team a!", "--slices", "1"], ["tenant", "'team a!'", "letters, digits"]),
    ],
)
def test_a_bad_quota_is_refused_naming_the_field_and_writes_nothing(fleet, cli_env, args, names):
    refused = _cli("quota", "set", *args, env=cli_env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert all(name in message for name in names), message
    assert json.loads(_cli("quota", "list", "--json", env=cli_env).stdout) == []


def test_clearing_a_tenant_without_a_quota_says_so(fleet, cli_env):
    cleared = _cli("quota", "clear", "nobody", env=cli_env)
    assert cleared.returncode == 1 and "nobody has no quota" in " ".join(cleared.stderr.split())
