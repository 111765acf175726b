"""The mig-cluster block, against the real (temporary) Prefect API."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_mig import MigTaskRunner
from prefect_mig.blocks import MigCluster

from .test_prefect_integration import env_of_slice

ROOT = Path(__file__).resolve().parents[1]


class TestMigClusterBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return MigCluster

    def test_has_a_valid_image(self, block):  # the standard test downloads the logo; no network here
        assert str(block._logo_url).startswith("https://")


def test_block_saves_loads_and_drives_a_task_runner(cluster, redis_server, namespace):
    from prefect import flow

    from prefect_mig import task

    MigCluster(redis_url=redis_server.url, namespace=namespace, gpu_runtime="none", default_priority=4).save(
        "ci-cluster", overwrite=True
    )
    loaded = MigCluster.load("ci-cluster")
    assert loaded.redis_url.get_secret_value() == redis_server.url and loaded.namespace == namespace

    t = task(task_runner=MigTaskRunner(profile="1g.10gb", cluster=loaded))(env_of_slice)

    @flow
    def pipeline():
        return t(3)

    assert pipeline()[1].startswith("MIG-")
    granted = [e for e in cluster.events() if e["type"] == "lease.granted"]
    assert [e["priority"] for e in granted] == ["4"]


def test_the_blocks_module_registers_with_the_prefect_cli(tmp_path):
    import os

    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_mig.blocks"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mig-cluster" in done.stdout.lower() or "MIG Cluster" in done.stdout


def test_the_default_block_script_saves_a_document(prefect_api, redis_server, monkeypatch):
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", "from-script")
    runpy.run_path(str(ROOT / "blocks" / "create_defaults.py"), run_name="not_main")["create_default"]("scripted")
    assert MigCluster.load("scripted").namespace == "from-script"
