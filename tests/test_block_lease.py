"""The MigCluster block leases slices itself (``with`` and ``async with``), for work that runs
outside a container, and says how the cluster is doing."""

from __future__ import annotations

import asyncio
import time

import pytest

from prefect_mig.blocks import MigCluster
from prefect_mig.errors import ConfigError

pytestmark = pytest.mark.redis


@pytest.fixture
def cluster(redis_server, namespace) -> MigCluster:
    block = MigCluster(redis_url=redis_server.url, namespace=namespace, lease_ttl_s=3)
    block.lease_client().allocator.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["2g.12gb@0", "2g.12gb@2"]})
    return block


def test_a_block_lease_is_renewed_while_held_and_released_on_an_error(cluster):
    with pytest.raises(RuntimeError, match="boom"):
        with cluster.lease("2g.12gb", priority=5, tenant="team-a") as lease:
            assert lease.mig_uuid.startswith("MIG-")
            (row,) = cluster.status()["leases"]
            assert row["lease_id"] == lease.lease_id
            time.sleep(4)  # past the 3 s TTL: only renewal keeps it
            assert [r["lease_id"] for r in cluster.status()["leases"]] == [lease.lease_id]
            assert not lease.lost.is_set()
            raise RuntimeError("boom")
    assert cluster.status()["leases"] == []


def test_async_with_leases_and_releases(cluster):
    async def use() -> str:
        async with cluster.lease(">=12gb") as lease:
            assert len(cluster.status()["leases"]) == 1
            return lease.slice.profile

    assert asyncio.run(use()) == "2g.12gb"
    assert cluster.status()["leases"] == []


@pytest.mark.parametrize(("kwargs", "field"), [({"profile": "nope"}, "profile"), ({"profile": "2g.12gb", "priority": 500}, "priority")])
def test_a_bad_request_names_the_field_and_holds_nothing(cluster, kwargs, field):
    with pytest.raises(ConfigError) as caught:
        cluster.lease(**kwargs)
    assert caught.value.field == field
    assert cluster.status()["leases"] == [] and cluster.status()["queue"] == []
