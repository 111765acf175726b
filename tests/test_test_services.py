"""The services every other test stands on: private redis-servers, the Docker engine, the test image.

Mirrors ``prefect_mig/testing/redis_server.py``, ``prefect_mig/launchers/images.py`` and the
fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import inspect
import re
import socket
import stat
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import docker
import pytest
import redis

from prefect_mig.launchers import images as docker_engine
from prefect_mig.launchers.images import ContainerFailed, DockerEngineUnavailable, run_python
from prefect_mig.testing.redis_server import RedisServer, RedisServerNotInstalled

CONFTEST = Path(__file__).with_name("conftest.py")


def containers_labelled(client: docker.DockerClient, labels: dict[str, str]) -> list:
    """All containers, running or not, that carry every one of ``labels``."""
    return client.containers.list(all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]}, ignore_removed=True)


def answers_on(port: int) -> bool:
    """Whether anything accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# -- private redis-server ---------------------------------------------------------------------------


@pytest.mark.redis
def test_private_redis_server_answers_ping_on_its_own_port(
    redis_server: RedisServer, redis_client: redis.Redis, fresh_redis_server: RedisServer
) -> None:
    assert redis_client.ping()
    assert int(redis_client.config_get("port")["port"]) == redis_server.port
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert fresh_redis_server.port not in (redis_server.port, 6379)
    redis_client.set("owner", "session")
    assert fresh_redis_server.client().get("owner") is None


@pytest.mark.redis
def test_private_redis_server_keeps_data_in_a_private_dir_removed_on_stop(
    fresh_redis_server: RedisServer,
) -> None:
    client = fresh_redis_server.client(decode_responses=True)
    data_dir = fresh_redis_server.dir
    assert client.config_get("dir")["dir"] == str(data_dir)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert data_dir.parent == Path(tempfile.gettempdir())
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    port = fresh_redis_server.port
    fresh_redis_server.stop()
    assert not data_dir.exists()
    assert not answers_on(port)


@pytest.mark.redis
def test_key_written_with_aof_survives_restart_on_same_port_and_dir(fresh_redis_server: RedisServer) -> None:
    port, data_dir = fresh_redis_server.port, fresh_redis_server.dir
    fresh_redis_server.client().set("lease", "kept")
    fresh_redis_server.restart()
    assert (fresh_redis_server.port, fresh_redis_server.dir) == (port, data_dir)
    assert fresh_redis_server.client().get("lease") == b"kept"


@pytest.mark.redis
def test_killed_redis_server_replays_its_aof_on_restart(fresh_redis_server: RedisServer) -> None:
    client = fresh_redis_server.client()
    client.config_set("appendfsync", "always")  # so the write is on disk before the crash
    client.set("lease", "fsynced")
    fresh_redis_server.kill()
    assert not fresh_redis_server.running
    assert not answers_on(fresh_redis_server.port)
    fresh_redis_server.restart()
    assert fresh_redis_server.client().get("lease") == b"fsynced"


def test_missing_redis_binary_error_names_the_package_to_install() -> None:
    with pytest.raises(RedisServerNotInstalled) as raised:
        RedisServer(binary="redis-server-that-is-not-installed").start()
    assert "redis-server-that-is-not-installed" in str(raised.value)
    assert "apt-get install redis-server" in str(raised.value)


def docstring_examples(obj: object) -> list[str]:
    """The fenced ```python blocks of ``obj``'s docstring."""
    blocks = re.findall(r"```python\n(.*?)```", inspect.getdoc(obj) or "", re.S)
    return [textwrap.dedent(block) for block in blocks]


@pytest.mark.redis
def test_redis_server_docstring_example_runs(redis_server: RedisServer) -> None:
    (example,) = docstring_examples(RedisServer)
    exec(compile(example, "<RedisServer example>", "exec"), {})


# -- Docker engine and test image -------------------------------------------------------------------


@pytest.mark.docker
def test_python_image_runs_the_host_python_minor_version(
    docker_client: docker.DockerClient, python_image: str
) -> None:
    assert docker_engine.image_python_version(docker_client, python_image) == sys.version_info[:2]


@pytest.mark.docker
def test_container_sees_only_the_loopback_interface(
    docker_client: docker.DockerClient, python_image: str
) -> None:
    code = (
        "import os\n"
        "print(*sorted(os.listdir('/sys/class/net')))\n"
        "print(*sorted(line.split(':')[0].strip() for line in open('/proc/net/dev') if ':' in line))"
    )
    sys_class_net, proc_net_dev = run_python(docker_client, python_image, code).splitlines()
    assert sys_class_net == "lo"
    assert proc_net_dev == "lo"


@pytest.mark.docker
def test_container_is_removed_after_its_code_finishes(
    docker_client: docker.DockerClient, python_image: str
) -> None:
    run_label = {"prefect-mig.test-run": uuid.uuid4().hex}
    code = "import time; time.sleep(1); print('done')"
    outputs: list[str] = []
    run = threading.Thread(
        target=lambda: outputs.append(run_python(docker_client, python_image, code, labels=run_label))
    )
    run.start()
    seen_while_running = False
    while run.is_alive() and not seen_while_running:
        seen_while_running = bool(containers_labelled(docker_client, run_label))
        time.sleep(0.05)
    run.join()

    assert seen_while_running, "the label filter never saw the running container"
    assert outputs == ["done\n"]
    assert containers_labelled(docker_client, run_label) == []


@pytest.mark.docker
def test_failing_code_raises_container_failed_and_its_container_is_removed(
    docker_client: docker.DockerClient, python_image: str
) -> None:
    run_label = {"prefect-mig.test-run": uuid.uuid4().hex}
    code = "import sys; print('bad input'); sys.exit(3)"
    with pytest.raises(ContainerFailed) as raised:
        run_python(docker_client, python_image, code, labels=run_label)
    assert raised.value.exit_code == 3
    assert "bad input" in raised.value.output
    assert containers_labelled(docker_client, run_label) == []


@pytest.mark.docker
@pytest.mark.parametrize("function", [docker_engine.docker_client, docker_engine.run_python])
def test_docker_engine_docstring_examples_run(python_image: str, function: object) -> None:
    (example,) = docstring_examples(function)
    exec(compile(example, f"<{function.__name__} example>", "exec"), {})


def test_unreachable_docker_engine_error_says_how_to_start_one() -> None:
    with pytest.raises(DockerEngineUnavailable) as raised:
        docker_engine.docker_client("tcp://127.0.0.1:1")
    assert raised.value.base_url == "tcp://127.0.0.1:1"
    assert "DOCKER_HOST" in str(raised.value)
    assert "dockerd" in str(raised.value)


# -- the fixtures' rule: skip where a service is missing, fail under CI -----------------------------


@pytest.mark.parametrize(
    ("ci", "outcome"), [("", {"skipped": 1}), ("false", {"skipped": 1}), ("true", {"errors": 1})]
)
@pytest.mark.parametrize("fixture", ["redis_server", "docker_client"])
def test_missing_service_skips_locally_and_fails_under_ci(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fixture: str,
    ci: str,
    outcome: dict[str, int],
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the inner run needs no plugins; faster
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(f"def test_uses_service({fixture}):\n    pass\n")

    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")

    result.assert_outcomes(**outcome)
    what_to_do = "*apt-get install redis-server*" if fixture == "redis_server" else "*DOCKER_HOST*"
    result.stdout.fnmatch_lines([what_to_do])
