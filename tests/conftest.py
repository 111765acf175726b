"""Shared fixtures: a private redis-server and the Docker engine with the Python test image.

Tests use the real services that ``make test`` (and ``bash .ci/run``) installs and starts. When a
service is missing, its fixtures skip the test with what to install; under CI (environment variable
``CI`` set to anything but ``""``, ``0`` or ``false``) they fail it instead, so CI never passes by
skipping.

Fixtures for other subjects (simulated NVML, allocator clocks, ...) belong in their own plugin
modules under ``prefect_mig/testing/`` or ``tests/``, named in a ``pytest_plugins`` list here, rather
than growing this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import docker
import pytest
import redis

from prefect_mig.launchers import images as docker_engine
from prefect_mig.testing.redis_server import RedisServer, RedisServerNotInstalled

pytest_plugins = ["pytester", "tests.allocator_fixtures", "tests.api_fixtures", "tests.prefect_fixtures", "tests.nvml_stub_fixtures", "tests.cluster_fixtures", "tests.agent_fixtures"]  # pytester: tests of these fixtures


def in_ci() -> bool:
    """Whether this run is CI, where a missing test service is an error rather than a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def service_unavailable(reason: str) -> NoReturn:
    """Skip the requesting test because a service is missing, or fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason}\n(CI is set, so a missing test service fails the run.)", pytrace=False)
    pytest.skip(reason)


def start_redis_server() -> RedisServer:
    """Start a private redis-server, or skip/fail the requesting test when the binary is missing."""
    try:
        return RedisServer().start()
    except RedisServerNotInstalled as exc:
        service_unavailable(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session (free port on 127.0.0.1, temp dir, AOF on).

    Tests that stop, restart or kill a server use ``fresh_redis_server`` instead.
    """
    with start_redis_server() as server:
        yield server


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, restart or kill; stopped after the test."""
    with start_redis_server() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on database 0 of ``redis_server``; the database is flushed after the test."""
    client = redis_server.client()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the Docker engine named by ``DOCKER_HOST`` (default: the local socket)."""
    try:
        client = docker_engine.docker_client()
    except docker_engine.DockerEngineUnavailable as exc:
        service_unavailable(str(exc))
    yield client
    client.close()


@pytest.fixture(scope="session")
def python_image(docker_client: docker.DockerClient) -> str:
    """The tag of the Python test image, built if missing, running the host's Python minor version."""
    try:
        tag = docker_engine.ensure_python_image(docker_client)
        docker_engine.check_python_matches(docker_client, tag)
    except docker_engine.PythonImageError as exc:
        service_unavailable(str(exc))
    return tag
