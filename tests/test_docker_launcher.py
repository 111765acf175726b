"""The Docker launcher on the real engine and the local test image."""

from __future__ import annotations

import sys
import threading
import time

import docker
import pytest

from prefect_mig.errors import (
    ContainerFailed,
    ContainerStopped,
    DockerUnavailable,
    ImageNotFound,
    ImagePythonMismatch,
    LaunchError,
    RemoteTraceback,
)
from prefect_mig.launchers import ContainerSettings, DockerLauncher
from prefect_mig.launchers.docker import LABEL_PREFIX
from tests.project_fixtures import write_cached_loader, write_lazy_project


def _ours(docker_client, run_id):
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}run={run_id}"}, ignore_removed=True)


def see_environment():
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"], os.environ["NVIDIA_VISIBLE_DEVICES"], sorted(os.listdir("/sys/class/net"))


def raise_value_error(n):
    raise ValueError(f"bad input {n}")


def sleep_long():
    import time

    time.sleep(60)


def print_lines():
    for i in range(3):
        print(f"line {i}", flush=True)
    return "done"


def exit_hard():
    import os

    os._exit(9)


def leave_a_thread_and_a_process_running():
    import multiprocessing
    import threading
    import time

    threading.Thread(target=time.sleep, args=(3600,), name="server-thread").start()
    multiprocessing.Process(target=time.sleep, args=(3600,)).start()
    return "value"


def return_a_value_of_an_image_only_type():
    import sys

    with open("/tmp/only_in_the_image.py", "w") as f:
        f.write("class Thing:\n    pass\n")
    sys.path.insert(0, "/tmp")
    import only_in_the_image

    return only_in_the_image.Thing()


def use_up_the_threads():
    import threading
    import time

    started = 0
    try:
        while True:
            threading.Thread(target=time.sleep, args=(3600,)).start()
            started += 1
    except RuntimeError:  # can't start new thread: the container's pids_limit
        return started


def use_all_memory():
    held = []
    while True:
        held.append(bytearray(10_000_000))


@pytest.fixture
def launcher(python_image):
    return DockerLauncher(ContainerSettings(image=python_image))


def test_the_body_sees_exactly_its_mig_uuid_and_no_network(launcher, docker_client):
    cuda, nvidia, nets = launcher.run(see_environment, mig_uuid="MIG-1234", labels={"run": "env"})
    assert (cuda, nvidia) == ("MIG-1234", "MIG-1234")
    assert nets == ["lo"]
    assert _ours(docker_client, "env") == []


def test_arguments_and_return_values_travel_with_cloudpickle(launcher):
    assert launcher.run(lambda a, b=1: {"sum": a + b}, (2,), {"b": 40}, mig_uuid="MIG-x") == {"sum": 42}


def test_a_body_that_raises_raises_here_with_the_remote_traceback(launcher, docker_client):
    with pytest.raises(ValueError, match="bad input 7") as raised:
        launcher.run(raise_value_error, (7,), mig_uuid="MIG-x", labels={"run": "raise"})
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in raised.value.__cause__.tb
    assert _ours(docker_client, "raise") == []


def test_a_body_that_raises_names_its_own_file_in_both_tracebacks(launcher):
    """cloudpickle drops the file names of code it sends by value: the container's traceback read
    File "<dynamic-code>" for the body's frames. They now name the flow-side file they came from,
    and the rebuilt traceback shows that file's source line."""
    import traceback

    with pytest.raises(ValueError) as raised:
        launcher.run(raise_value_error, (7,), mig_uuid="MIG-x", labels={"run": "raise-file"})
    assert f'File "{__file__}", line' in raised.value.__cause__.tb and "<dynamic-code>" not in raised.value.__cause__.tb
    here = "".join(traceback.format_exception(raised.value))
    assert 'raise ValueError(f"bad input {n}")' in here and "<dynamic-code>" not in here


def test_container_output_streams_line_by_line(launcher):
    lines = []
    assert launcher.run(print_lines, mig_uuid="MIG-x", on_log=lines.append) == "done"
    assert lines == ["line 0", "line 1", "line 2"]


def test_stop_kills_the_container_and_removes_it(launcher, docker_client):
    event = threading.Event()
    threading.Timer(1.0, event.set).start()
    started = time.monotonic()
    with pytest.raises(ContainerStopped):
        launcher.run(sleep_long, mig_uuid="MIG-x", labels={"run": "stop"}, stop=event)
    assert time.monotonic() - started < 15
    assert _ours(docker_client, "stop") == []


def test_a_body_that_leaves_threads_or_processes_running_returns_its_value_and_leaves_nothing(launcher, docker_client):
    # Python waits for non-daemon threads and multiprocessing children at exit: the task, its value
    # written, waited for them (here an hour) with its slice, and a timeout then said it was stopped
    gave_up = threading.Event()
    threading.Timer(60, gave_up.set).start()
    lines: list[str] = []
    started = time.monotonic()
    assert launcher.run(
        leave_a_thread_and_a_process_running, mig_uuid="MIG-x", labels={"run": "linger"}, stop=gave_up, on_log=lines.append
    ) == "value"
    assert time.monotonic() - started < 30
    gave_up.set()
    assert any("left server-thread, process " in line and "running" in line for line in lines), lines
    assert _ours(docker_client, "linger") == []


def test_a_body_that_used_up_the_pids_limit_with_threads_left_running_returns_its_value(python_image, docker_client):
    # with no thread to spare for the exit's own timer, the interpreter waited for the body's threads
    launcher = DockerLauncher(ContainerSettings(image=python_image, pids_limit=16))
    gave_up = threading.Event()
    threading.Timer(60, gave_up.set).start()
    started = launcher.run(use_up_the_threads, mig_uuid="MIG-x", labels={"run": "no-pids"}, stop=gave_up)
    gave_up.set()
    assert 0 < started < 16
    assert _ours(docker_client, "no-pids") == []


def test_a_container_that_dies_without_an_outcome_is_reported_and_removed(launcher, docker_client):
    with pytest.raises(ContainerFailed) as failed:
        launcher.run(exit_hard, mig_uuid="MIG-x", labels={"run": "die"})
    assert failed.value.exit_code == 9
    assert not failed.value.oom_killed and "out of memory" not in str(failed.value)
    assert _ours(docker_client, "die") == []


def test_a_value_of_a_type_only_the_image_has_fails_saying_so_and_leaves_nothing(launcher, docker_client):
    # it raised the bare ModuleNotFoundError of the host's unpickling, as if the body had
    with pytest.raises(LaunchError) as failed:
        launcher.run(return_a_value_of_an_image_only_type, mig_uuid="MIG-x", labels={"run": "unloadable"})
    assert "its value cannot be loaded in the flow's process" in str(failed.value)
    assert "No module named 'only_in_the_image'" in str(failed.value)
    assert isinstance(failed.value.__cause__, ModuleNotFoundError)
    assert _ours(docker_client, "unloadable") == []


def test_a_body_killed_for_going_over_its_mem_limit_says_so_and_leaves_nothing(python_image, docker_client):
    # it said "exited with code 137 without an outcome (out of memory? killed?)": a guess, with the answer in Docker
    launcher = DockerLauncher(ContainerSettings(image=python_image, mem_limit="48m"))
    with pytest.raises(ContainerFailed) as failed:
        launcher.run(use_all_memory, mig_uuid="MIG-x", labels={"run": "oom"})
    assert failed.value.oom_killed and failed.value.exit_code == 137
    assert "ran out of memory of its mem_limit (48 MiB)" in str(failed.value)
    assert "larger mem_limit" in str(failed.value)
    assert _ours(docker_client, "oom") == []


def test_a_missing_image_is_a_clear_error_and_leaves_nothing(docker_client):
    launcher = DockerLauncher(ContainerSettings(image="prefect-mig-no-such-image:1"))
    with pytest.raises(ImageNotFound) as missing:
        launcher.run(print_lines, mig_uuid="MIG-x", labels={"run": "missing"})
    assert "no registry" in str(missing.value) and missing.value.image == "prefect-mig-no-such-image:1"
    assert f"the Docker engine at {launcher.engine_url};" in str(missing.value)  # unix://..., not http+docker://localhost
    assert _ours(docker_client, "missing") == []


def test_a_docker_engine_that_is_down_is_a_clear_error():
    launcher = DockerLauncher(ContainerSettings(docker_host="tcp://127.0.0.1:1"))
    with pytest.raises(DockerUnavailable) as down:
        launcher.run(print_lines, mig_uuid="MIG-x")
    assert "tcp://127.0.0.1:1" in str(down.value)


@pytest.fixture
def wrong_python_image(docker_client, python_image):
    """The test image with a python3 that reports 3.7."""
    tag = "prefect-mig-test-wrong-python:2"
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        c = docker_client.containers.run(
            python_image,
            ["sh", "-c", "rm /usr/bin/python3 && printf '#!/bin/sh\\necho \"(3, 7)\"\\n' > /usr/bin/python3 && chmod +x /usr/bin/python3"],
            detach=True,
            network_disabled=True,
        )
        c.wait()
        c.commit(repository="prefect-mig-test-wrong-python", tag="2")
        c.remove()
    return tag


def test_an_image_with_another_python_minor_is_refused(wrong_python_image, docker_client):
    launcher = DockerLauncher(ContainerSettings(image=wrong_python_image))
    with pytest.raises(ImagePythonMismatch) as refused:
        launcher.run(print_lines, mig_uuid="MIG-x", labels={"run": "wrongpy"})
    assert "Python 3.7" in str(refused.value)
    assert _ours(docker_client, "wrongpy") == []


def test_limits_env_and_volumes_are_applied(python_image, docker_client):
    def read():
        import os

        return os.environ["EXTRA"], open("/data/hello.txt").read()

    volume = docker_client.volumes.create()
    try:
        seed = docker_client.containers.run(
            python_image, ["sh", "-c", "echo hi > /data/hello.txt"], volumes=[f"{volume.name}:/data"], remove=True, network_disabled=True
        )
        del seed
        launcher = DockerLauncher(
            ContainerSettings(image=python_image, env={"EXTRA": "1"}, volumes=[f"{volume.name}:/data:ro"], cpus=0.5, mem_limit="256m")
        )
        assert launcher.run(read, mig_uuid="MIG-x") == ("1", "hi\n")
    finally:
        volume.remove(force=True)


def sleep_a_while(seconds):
    import time

    time.sleep(seconds)
    return "done"


def test_a_body_that_runs_past_the_engine_gone_limit_still_completes(python_image):
    """Docker's wait answers a poll that runs out with a ConnectionError around a read timeout: that
    is a body still running, not the engine gone, however long the body runs."""

    class QuickToGiveUp(DockerLauncher):
        ENGINE_GONE_S = 1.0  # the real limit is 10 s; the body below runs several of these

    launcher = QuickToGiveUp(ContainerSettings(image=python_image))
    assert launcher.run(sleep_a_while, (4,), mig_uuid="MIG-test-long", poll_s=0.25) == "done"


def test_calls_of_one_module_pickled_at_once_in_many_threads_each_carry_it_by_value():
    """A map pickles its tasks in several threads at once. Each call must carry its (not installed)
    module by value, since the container has no copy of it, and no thread may unregister the module
    under another (seen as a mapped task failing with 'ValueError: ... is not registered for pickle
    by value')."""
    import cloudpickle

    from prefect_mig.launchers.docker import _pickle_call

    payloads, errors = [], []

    def pickle_many() -> None:
        for _ in range(300):
            try:
                payloads.append(_pickle_call(sleep_a_while, (1,), {}))
            except Exception as exc:  # noqa: BLE001 - the test counts what the pickling raised
                errors.append(exc)

    threads = [threading.Thread(target=pickle_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(payloads) == 2400 and all(b"done" in payload for payload in payloads)  # its code, not a reference
    assert __name__ not in cloudpickle.list_registry_pickle_by_value()


def test_a_container_the_engine_makes_after_a_cut_short_create_is_still_removed(docker_client, python_image):
    # A task's timeout can cut a create request short while the engine goes on making the
    # container; the cleanup's first look then finds nothing. The container here appears a second
    # after remove_launched starts looking, as the engine's late one would.
    import uuid

    from prefect_mig.launchers.runtime import remove_launched

    launch_id = uuid.uuid4().hex
    labels = {f"{LABEL_PREFIX}launch-id": launch_id}

    def late_create():
        time.sleep(1.0)
        docker_client.containers.create(python_image, command=["true"], labels=labels)

    creator = threading.Thread(target=late_create)
    creator.start()
    try:
        # 30 s, not the default 10 s: on a loaded engine the late create itself can take seconds
        remove_launched(docker_client, launch_id, within_s=30)
        creator.join(30)
        assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}launch-id={launch_id}"}) == []
    finally:
        creator.join(30)
        for left in docker_client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}launch-id={launch_id}"}):
            left.remove(force=True)


def test_a_body_using_another_module_of_the_flows_project_runs_and_its_exception_comes_back(
    launcher, docker_client, tmp_path, monkeypatch
):
    """A task's module imports helpers and an exception type from a sibling module of the user's
    project (not installed, so the image has no copy): those travel by value too, and the exception
    comes back as that very type (a new-user trial: `from myerrors import BadBatch` failed in the
    container with "No module named 'myerrors'")."""
    import cloudpickle

    (tmp_path / "pmig_trial_errors.py").write_text(
        "class BadBatch(Exception):\n"
        "    def __init__(self, batch_id, reason):\n"
        "        super().__init__(f'batch {batch_id}: {reason}')\n"
        "        self.batch_id, self.reason = batch_id, reason\n"
        "\n"
        "def check(batch):\n"
        "    if batch < 0:\n"
        "        raise BadBatch(batch, 'negative')\n"
        "    return batch * 2\n"
    )
    (tmp_path / "pmig_trial_flow.py").write_text(
        "from pmig_trial_errors import check\n\ndef body(batch):\n    return check(batch)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pmig_trial_errors", "pmig_trial_flow"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import pmig_trial_errors
    import pmig_trial_flow

    assert launcher.run(pmig_trial_flow.body, (21,), mig_uuid="MIG-x", labels={"run": "project"}) == 42
    with pytest.raises(pmig_trial_errors.BadBatch, match="batch -1: negative") as raised:
        launcher.run(pmig_trial_flow.body, (-1,), mig_uuid="MIG-x", labels={"run": "project"})
    assert (raised.value.batch_id, raised.value.reason) == (-1, "negative")
    assert "check" in raised.value.__cause__.tb  # raised in the sibling module, in the container
    registered = cloudpickle.list_registry_pickle_by_value()
    assert not {"pmig_trial_errors", "pmig_trial_flow", "prefect_mig"} & set(registered)
    assert _ours(docker_client, "project") == []


def test_a_project_under_pythons_own_prefix_is_still_the_users_code():
    """A project in /usr/src/app (the official Python images' examples) with Python in /usr lies
    under ``sys.base_prefix``: it was taken for an installed module and its sources never went."""
    import json
    import os

    from prefect_mig.launchers.project_sources import is_user_file

    assert is_user_file("helpers", os.path.join(sys.base_prefix, "src", "app", "helpers.py"))
    assert not is_user_file("json", json.__file__)
    assert not is_user_file("pytest", pytest.__file__)


def test_a_project_module_the_body_imports_only_when_it_runs_goes_with_the_call(launcher, docker_client, tmp_path, monkeypatch):
    """A new-user trial: a body's own `import sibling` of a module next to the flow file failed in
    the container with "No module named 'sibling'", whether the flow's process had imported it or
    not. Its source now goes with the call (found on the flow's sys.path, not imported here), with
    the package and the modules it imports in turn, and so do those that functions and methods of
    the project the body calls import."""
    import importlib

    write_lazy_project(tmp_path, monkeypatch, "pmig_cold")
    body = importlib.import_module("pmig_cold_flow").body
    assert launcher.run(body, (20,), mig_uuid="MIG-x", labels={"run": "lazy"}) == "label 42!"
    with pytest.raises(ValueError, match="negative -") as raised:
        launcher.run(body, (-5,), mig_uuid="MIG-x", labels={"run": "lazy"})
    assert str(tmp_path / "pmig_cold_lazy.py") in raised.value.__cause__.tb  # the flow-side file, with its line
    assert "raise ValueError(f'negative {x}')" in raised.value.__cause__.tb
    assert not {"pmig_cold_lazy", "pmig_cold_dep", "pmig_cold_pkg", "pmig_cold_helper", "pmig_cold_classdep"} & set(sys.modules)
    assert _ours(docker_client, "lazy") == []


SOME_MOCK = None


def body_using_a_mock():
    return SOME_MOCK.predict(), SOME_MOCK


def test_a_body_whose_globals_hold_a_mock_pickles_and_sends_no_source(monkeypatch):
    """The look for the modules a body imports follows its globals, and a mock among them (a user's
    test of their flow) answers every attribute it is asked for: the call still pickles, with no
    source sent."""
    import cloudpickle
    from unittest import mock

    from prefect_mig.launchers.docker import _pickle_call, check_call_pickles
    from prefect_mig.launchers.project_sources import project_sources

    monkeypatch.setattr(sys.modules[__name__], "SOME_MOCK", mock.MagicMock())
    assert project_sources(body_using_a_mock) == {}
    check_call_pickles(body_using_a_mock, (), {})
    fn, args, kwargs, *side = cloudpickle.loads(_pickle_call(body_using_a_mock, (), {}))
    assert side == [] or "project_sources" not in side[0]


def test_a_body_calling_a_functools_cache_loader_of_the_flows_project_runs(launcher, docker_client, tmp_path, monkeypatch):
    """A new-user trial of the README's warm example: a loader under `@functools.cache` in the flow's
    file failed the task at once with "Can't get attribute 'model' on <module '__main__'>" (the cache
    wrapper went by reference to a module the container lacks)."""
    import importlib

    write_cached_loader(tmp_path, monkeypatch, "pmig_cached_cold")
    body = importlib.import_module("pmig_cached_cold").body
    assert launcher.run(body, (2,), mig_uuid="MIG-x", labels={"run": "cached"}) == (1, 20, {"maxsize": 4, "typed": True})
    assert _ours(docker_client, "cached") == []


def test_a_global_of_the_flows_code_that_cannot_be_pickled_is_named_with_the_function_using_it(tmp_path, monkeypatch):
    """A new-user trial: a module-level lock that a helper of the body uses failed the task with
    "the task's function of body (a function) cannot be sent", naming neither the lock nor the helper."""
    import importlib

    from prefect_mig.errors import ConfigError
    from prefect_mig.launchers.docker import check_call_pickles

    (tmp_path / "pmig_global_lock.py").write_text(
        "import threading\n\nLOCK = threading.Lock()\n\ndef helper(x):\n    with LOCK:\n        return x\n\n"
        "def body(x):\n    return helper(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pmig_global_lock", raising=False)
    body = importlib.import_module("pmig_global_lock").body
    with pytest.raises(ConfigError, match=r"global 'LOCK' \(a _thread\.lock\) that helper uses") as raised:
        check_call_pickles(body, (1,), {})
    assert raised.value.field == "LOCK"
    assert "cannot pickle '_thread.lock' object" in str(raised.value)


def test_a_project_module_that_cannot_be_pickled_leaves_the_call_to_its_own_module_by_value(tmp_path, monkeypatch):
    """A sibling module holding a lock cannot travel by value: the call then goes with only its
    function's module by value and the sibling by reference, as an image with the project
    installed needs (the call must not fail to pickle where it used to work)."""
    import cloudpickle

    from prefect_mig.launchers.docker import _pickle_call

    (tmp_path / "pmig_trial_locked.py").write_text(
        "import threading\n_LOCK = threading.Lock()\n\ndef guarded(x):\n    with _LOCK:\n        return x + 1\n"
    )
    (tmp_path / "pmig_trial_user.py").write_text("from pmig_trial_locked import guarded\n\ndef body(x):\n    return guarded(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pmig_trial_locked", "pmig_trial_user"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import pmig_trial_user

    fn, args, kwargs = cloudpickle.loads(_pickle_call(pmig_trial_user.body, (1,), {}))
    assert fn(*args, **kwargs) == 2
    assert not {"pmig_trial_locked", "pmig_trial_user"} & set(cloudpickle.list_registry_pickle_by_value())


MISSING_NETWORK = "prefect-mig-no-such-network"


def test_a_network_the_engine_lacks_is_named_not_read_as_a_container_removed_under_the_task(python_image, docker_client):
    """The engine's 404 for the network, at start, read as the container's own: the task failed saying
    something else removed its container while it ran (and the runner said: an agent of another cluster?)."""
    launcher = DockerLauncher(ContainerSettings(image=python_image, network=MISSING_NETWORK))
    with pytest.raises(LaunchError) as refused:
        launcher.run(print_lines, mig_uuid="MIG-x", labels={"run": "no-network"})
    assert not isinstance(refused.value, ContainerStopped)
    said = str(refused.value)
    assert f"network={MISSING_NETWORK!r}" in said and "docker network create" in said and "removed" not in said
    assert _ours(docker_client, "no-network") == []


def test_a_network_removed_after_the_launcher_checked_it_is_named_when_the_container_cannot_start(python_image, docker_client):
    import uuid

    network = docker_client.networks.create(f"prefect-mig-test-{uuid.uuid4().hex[:8]}")
    launcher = DockerLauncher(ContainerSettings(image=python_image, network=network.name))
    launcher.check_python()  # checked once per launcher, the network with the image
    network.remove()
    with pytest.raises(LaunchError, match=f"network={network.name!r}: .* has no such network") as refused:
        launcher.run(print_lines, mig_uuid="MIG-x", labels={"run": "network-gone"})
    assert not isinstance(refused.value, ContainerStopped)
    assert _ours(docker_client, "network-gone") == []


def test_a_task_asking_for_a_network_the_engine_lacks_fails_before_it_takes_a_lease(
    python_image, redis_server, namespace, monkeypatch
):
    from prefect_mig import MigTaskRunner
    from prefect_mig.allocator import Allocator

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", namespace)
    alloc = Allocator(redis_server.client(), namespace)
    alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
    runner = MigTaskRunner(profile="4g.24gb", image=python_image, network=MISSING_NETWORK, wait_timeout_s=0)
    with pytest.raises(LaunchError, match=f"network={MISSING_NETWORK!r}"):
        runner.run_in_slice(print_lines, (), {})
    assert [e["type"] for e in alloc.events() if e["type"].startswith("lease.")] == []


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("volumes", "/srv/data:/data", "a list"),  # one string: read one character at a time, '/' made the engine answer 500
        ("volumes", ["/srv/data"], "host_or_name:/container/path"),
        ("volumes", ["data:relative"], "host_or_name:/container/path"),
        ("cpus", float("nan"), "finite"),
        ("cpus", 0, "greater than 0"),
        ("mem_limit", "lots", "pattern"),
        ("env", {"BATCH": 1}, "string"),
        ("network", "", "network name"),
        ("priority", True, "integer"),  # was priority 1
        ("priority", "5", "integer"),
        ("preemptible", "yes", "True or False"),  # was a yes
        ("image", "", "image name"),  # was the default image
    ],
)
def test_a_container_setting_the_engine_would_refuse_is_refused_when_the_runner_is_made_naming_it(field, value, said):
    """These failed only at the first task's run, after its lease was taken, as pydantic's errors about an
    internal `ContainerSettings`, or as an engine failure ('node node-a's Docker engine failed: ... 500')."""
    from prefect_mig import MigTaskRunner
    from prefect_mig.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        MigTaskRunner(profile="1g.10gb", **{field: value})
    assert refused.value.field == field and str(refused.value).startswith(f"MigTaskRunner {field}") and said in str(refused.value)
