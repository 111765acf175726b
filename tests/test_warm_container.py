"""A warm task container (launchers/warm.py) on the real engine: call after call in one process."""

from __future__ import annotations

import sys
import threading

import pytest

from prefect_mig.errors import ContainerFailed, ContainerStopped, DockerUnavailable, LaunchError
from prefect_mig.launchers import ContainerSettings, DockerLauncher
from prefect_mig.launchers.docker import LABEL_PREFIX
from prefect_mig.launchers.warm import WarmContainer
from tests.project_fixtures import write_cached_loader, write_lazy_project

CALLS = 0


def count_calls():
    """A module global kept by the warm process between calls (this module travels by value)."""
    import os
    import socket

    global CALLS
    CALLS += 1
    return CALLS, socket.gethostname(), os.getpid()


def see_env():
    import os

    return os.environ.get("PREFECT_MIG_RUN_COUNT"), os.environ.get("ONLY_FIRST"), os.environ["CUDA_VISIBLE_DEVICES"]


def talk(n):
    for i in range(n):
        print(f"call says {i}")
    return n


class BadBatch(Exception):
    def __init__(self, batch_id, reason):
        super().__init__(f"batch {batch_id}: {reason}")
        self.batch_id = batch_id


def fail(batch_id):
    raise BadBatch(batch_id, "no good")


def exit_hard():
    import os

    os._exit(7)


def sleep_long():
    import time

    time.sleep(60)


def say_without_a_newline():
    print("almost done", end="")
    return 1


def ask_for_a_token():
    return input("your token? ")


def return_a_value_of_an_image_only_type():
    import sys

    with open("/tmp/only_in_the_image.py", "w") as f:
        f.write("class Thing:\n    pass\n")
    sys.path.insert(0, "/tmp")
    import only_in_the_image

    return only_in_the_image.Thing()


@pytest.fixture
def warm(python_image, docker_client):
    run = f"warm-{threading.get_ident()}"
    container = WarmContainer.start(
        DockerLauncher(ContainerSettings(image=python_image)), mig_uuid="MIG-warm", labels={"run": run}
    )
    yield container
    container.stop()
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}run={run}"}) == []


def test_calls_run_in_one_process_that_keeps_its_module_globals(warm):
    got = [warm.call(count_calls) for _ in range(3)]
    assert [n for n, _, _ in got] == [1, 2, 3]
    assert len({(host, pid) for _, host, pid in got}) == 1
    assert got[0][1] == warm.container.id[:12]


def test_a_project_module_a_warm_call_imports_only_when_it_runs_goes_with_the_call(warm, tmp_path, monkeypatch):
    import importlib

    write_lazy_project(tmp_path, monkeypatch, "pmig_warm")
    body = importlib.import_module("pmig_warm_flow").body
    assert [warm.call(body, (x,)) for x in (20, 1)] == ["label 42!", "label 4!"]
    assert "pmig_warm_lazy" not in sys.modules


def test_a_functools_cache_loader_of_the_flows_project_loads_once_per_warm_process(warm, tmp_path, monkeypatch):
    import importlib

    write_cached_loader(tmp_path, monkeypatch, "pmig_cached_warm")
    body = importlib.import_module("pmig_cached_warm").body
    assert [warm.call(body, (x,))[:2] for x in (1, 2, 1)] == [(1, 10), (1, 20), (1, 10)]  # loaded once


def test_each_call_gets_its_own_environment(warm):
    first = warm.call(see_env, env={"PREFECT_MIG_RUN_COUNT": "1", "ONLY_FIRST": "yes"})
    second = warm.call(see_env, env={"PREFECT_MIG_RUN_COUNT": "1"})
    assert first == ("1", "yes", "MIG-warm")
    assert second == ("1", None, "MIG-warm")


def test_each_calls_output_goes_to_that_calls_log(warm):
    first: list[str] = []
    second: list[str] = []
    assert warm.call(talk, (2,), on_log=first.append) == 2
    assert warm.call(talk, (1,), on_log=second.append) == 1
    assert first == ["call says 0", "call says 1"]
    assert second == ["call says 0"]


def test_an_exception_comes_back_as_itself_and_the_process_serves_on(warm):
    with pytest.raises(BadBatch) as caught:
        warm.call(fail, ("b7",))
    assert caught.value.batch_id == "b7"
    assert "no good" in str(caught.value)
    assert warm.call(talk, (0,)) == 0


def test_a_value_of_a_type_only_the_image_has_fails_the_call_saying_so_and_the_process_serves_on(warm):
    # its unpickling killed the thread reading the process's output: the call waited forever (here
    # until its stop, then "stopped before the body finished"), holding the slice
    gave_up = threading.Event()
    threading.Timer(30, gave_up.set).start()
    with pytest.raises(LaunchError, match="its value cannot be loaded in the flow's process") as failed:
        warm.call(return_a_value_of_an_image_only_type, stop=gave_up)
    gave_up.set()
    assert "No module named 'only_in_the_image'" in str(failed.value)
    assert warm.call(see_env)[2] == "MIG-warm"


def test_output_without_a_last_newline_is_logged_as_it_is(warm):
    # the end mark shared its line: it was logged with the mark's bytes, and the call waited 5 s for the mark
    lines: list[str] = []
    assert warm.call(say_without_a_newline, on_log=lines.append) == 1
    assert lines == ["almost done"]


def test_a_body_that_reads_stdin_gets_eof_as_in_a_cold_container_and_the_process_serves_on(warm):
    # it read the warm process's own call channel: the call waited forever for input that never came
    gave_up = threading.Event()
    threading.Timer(30, gave_up.set).start()
    with pytest.raises(EOFError):
        warm.call(ask_for_a_token, stop=gave_up)
    gave_up.set()
    assert warm.call(see_env)[2] == "MIG-warm"


def test_a_process_that_dies_fails_the_call_and_never_serves_again(warm):
    with pytest.raises(ContainerFailed) as caught:
        warm.call(exit_hard)
    assert caught.value.exit_code == 7
    assert warm.broken
    with pytest.raises(ContainerStopped):
        warm.call(talk, (0,))


def test_a_stopped_call_kills_the_container_and_breaks_it(warm):
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with pytest.raises(ContainerStopped):
        warm.call(sleep_long, stop=stop)
    assert warm.broken


def test_the_process_exits_by_itself_when_its_client_goes_away(warm):
    assert warm.call(talk, (0,)) == 0
    import socket

    assert warm.container.attrs["Config"]["StdinOnce"] is True
    getattr(warm._sock, "_sock", warm._sock).shutdown(socket.SHUT_RDWR)  # as when the flow process dies
    assert warm.container.wait(timeout=60)["StatusCode"] == 0


def test_a_process_killed_while_idle_is_not_serving(warm, docker_client):
    assert warm.call(talk, (0,)) == 0 and warm.serving()
    docker_client.containers.get(warm.container.id).kill()  # as an engine restart or the OOM killer
    docker_client.containers.get(warm.container.id).wait(timeout=60)
    assert not warm.serving()


@pytest.mark.parametrize("when", ["before the call", "during the call"])
def test_a_warm_call_whose_engine_died_raises_docker_unavailable_with_the_removal_unconfirmed(second_engine, python_image, when):
    """The runner leaves the lease to lapse on `DockerUnavailable(unconfirmed)`: the container may
    still run. Before, a call sent after the engine died read as a container someone removed, and
    one under way as a raw requests ConnectionError."""
    warm = WarmContainer.start(DockerLauncher(ContainerSettings(image=python_image, docker_host=second_engine.url)),
                               mig_uuid="MIG-warm-engine")
    try:
        assert warm.call(talk, (0,)) == 0
        if when == "before the call":
            second_engine.kill()
            with pytest.raises(DockerUnavailable) as err:
                warm.call(talk, (0,))
        else:
            threading.Timer(2.0, second_engine.kill).start()
            with pytest.raises(DockerUnavailable) as err:
                warm.call(sleep_long)
        assert err.value.unconfirmed and second_engine.url in str(err.value)
        assert warm.broken
    finally:
        second_engine.restart()
        warm.stop()
