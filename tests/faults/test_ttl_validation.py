"""Finding 8: a lease TTL is a finite number of seconds from 1 to the cluster's maximum, wherever it
is given: `lease renew --ttl`, `Allocator.renew`, `Allocator.try_acquire`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from prefect_mig.allocator import Allocator, SliceRequest
from prefect_mig.errors import ConfigError

from .helpers import FLEET, ONE_SLICE


@pytest.mark.parametrize("ttl", [0, -100, math.nan, math.inf, 1e9])
def test_allocator_renew_refuses_a_ttl_out_of_range(redis_client, namespace, ttl):
    alloc = Allocator(redis_client, namespace, max_ttl_s=600)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE)
    held = alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=30))
    with pytest.raises(ConfigError, match="ttl_s") as refused:
        alloc.renew(held.lease_id, held.fence, ttl)
    assert refused.value.field == "ttl_s" and "600" in str(refused.value)
    assert alloc.lease(held.lease_id).expires_at_ms > alloc.now_ms() + 20_000  # untouched


def test_acquire_refuses_a_ttl_above_the_cluster_maximum(redis_client, namespace):
    alloc = Allocator(redis_client, namespace, max_ttl_s=600)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE)
    with pytest.raises(ConfigError, match="ttl_s=3600"):
        alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=3600))
    assert alloc.status()["leases"] == []


@pytest.mark.parametrize("ttl", ["1e9", "-100", "nan"])
def test_lease_renew_cli_names_the_ttl_option(redis_server, namespace, tmp_path, ttl):
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": redis_server.url, "PREFECT_MIG_NAMESPACE": namespace,
           "PREFECT_MIG_STATE_DIR": str(tmp_path)}
    alloc = Allocator(redis_server.client(), namespace)
    alloc.publish_fleet(FLEET, layouts=ONE_SLICE)
    held = alloc.try_acquire(SliceRequest(profile="4g.24gb", ttl_s=30))
    before = alloc.lease(held.lease_id).expires_at_ms
    done = subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", "lease", "renew", held.lease_id, "--fence", str(held.fence),
         "--ttl", ttl, "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode != 0
    assert "--ttl" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert alloc.lease(held.lease_id).expires_at_ms == before
    json.dumps(done.stdout)
