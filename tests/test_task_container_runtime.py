"""What comes back from a task container (issue 11): the payload's own import errors, exceptions of
any type with their args and traceback, and an image without python3. Real Docker, no Prefect."""

from __future__ import annotations

import io
import tarfile
import traceback

import docker.errors
import pytest

from prefect_mig.errors import ImageWithoutPython, RemoteTraceback, TaskBodyError
from prefect_mig.launchers import ContainerSettings, DockerLauncher


@pytest.fixture
def launcher(python_image):
    return DockerLauncher(ContainerSettings(image=python_image))


def test_a_payload_that_needs_a_module_the_image_lacks_comes_back_as_that_import_error(launcher):
    import redis  # installed here, not in the image: the call is pickled by reference

    with pytest.raises(ModuleNotFoundError, match="No module named 'redis'"):
        launcher.run(redis.Redis.from_url, ("redis://127.0.0.1:1",), {}, mig_uuid="MIG-test")


class BadBatch(Exception):
    def __init__(self, batch_id: int, reason: str) -> None:
        super().__init__(f"batch {batch_id} is bad: {reason}")
        self.batch_id, self.reason = batch_id, reason


def raise_bad_batch():
    raise BadBatch(7, "no rows")


def test_an_exception_with_its_own_init_comes_back_as_itself_with_its_traceback(launcher):
    with pytest.raises(BadBatch) as caught:
        launcher.run(raise_bad_batch, (), {}, mig_uuid="MIG-test")
    exc = caught.value
    assert str(exc) == "batch 7 is bad: no rows" and exc.args == ("batch 7 is bad: no rows",)
    assert (exc.batch_id, exc.reason) == (7, "no rows")
    assert "raise_bad_batch" in "".join(traceback.format_tb(exc.__traceback__))  # the container's frames
    assert isinstance(exc.__cause__, RemoteTraceback) and "raise_bad_batch" in str(exc.__cause__)


def raise_a_type_only_the_image_has():
    import sys

    with open("/tmp/only_in_image.py", "w") as f:
        f.write("class Gone(Exception):\n    pass\n")
    sys.path.insert(0, "/tmp")
    import only_in_image

    raise only_in_image.Gone("it was here")


def test_an_exception_whose_type_cannot_be_rebuilt_names_the_type_and_message(launcher):
    with pytest.raises(TaskBodyError) as caught:
        launcher.run(raise_a_type_only_the_image_has, (), {}, mig_uuid="MIG-test")
    exc = caught.value
    assert exc.type_name == "only_in_image.Gone" and exc.original_message == "it was here"
    assert "only_in_image.Gone: it was here" in str(exc) and "raise_a_type_only_the_image_has" in exc.traceback


@pytest.fixture(scope="module")
def image_without_python(docker_client):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"none\n"))
    tag = "prefect-mig-test-no-python:1"
    docker_client.api.import_image_from_data(buf.getvalue(), repository=tag.split(":")[0], tag="1")
    yield tag
    try:
        docker_client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def test_an_image_without_python3_is_a_typed_error_that_says_what_to_use(image_without_python, docker_client):
    launcher = DockerLauncher(ContainerSettings(image=image_without_python))
    with pytest.raises(ImageWithoutPython, match="has no python3") as caught:
        launcher.run(len, ("abc",), {}, mig_uuid="MIG-test")
    assert caught.value.image == image_without_python
    left = docker_client.containers.list(all=True, filters={"ancestor": image_without_python})
    assert left == []
