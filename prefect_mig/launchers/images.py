"""The Docker engine and the local Python image that task containers run (tests, demo, benchmarks).

No registry can be reached, so the image that runs task code in containers is built locally: a
minimal Debian root file system with ``python3`` from ``debootstrap``, imported into the engine as
``prefect-mig-python:bookworm``. Code is shipped to containers with cloudpickle, so the image's Python
must have the host's minor version; :func:`check_python_matches` says so early and clearly.

Every container this module starts has networking disabled and is removed afterwards.

Command line (used by ``make image`` and CI)::

    python -m prefect_mig.launchers.images ensure-image [--tag TAG] [--suite SUITE] [--mirror URL]
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
from docker.utils import kwargs_from_env

from prefect_mig.errors import PrefectMigError

__all__ = [
    "CONTAINER_LABEL",
    "DEFAULT_IMAGE_TAG",
    "ContainerFailed",
    "DockerEngineError",
    "DockerEngineUnavailable",
    "PythonImageError",
    "PythonVersionMismatch",
    "check_python_matches",
    "docker_client",
    "ensure_python_image",
    "image_python_version",
    "run_python",
]

DEFAULT_IMAGE_TAG = "prefect-mig-python:bookworm"
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Label on every container this module starts, so leftovers can be found with a filter.
CONTAINER_LABEL = "prefect-mig.testing"
_DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_START_ENGINE_HINT = (
    "Start a local engine with `sudo bash .ci/install-system` (it runs "
    "`setsid dockerd >/var/log/dockerd.log 2>&1 &` when systemd is absent), "
    "or set DOCKER_HOST to an engine that runs."
)


class DockerEngineError(PrefectMigError):
    """Base class for problems with the Docker engine or the test image."""


class DockerEngineUnavailable(DockerEngineError):
    """No Docker engine answers at the configured address.

    Attributes:
        base_url: The address that was tried.
    """

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(
            f"No Docker engine answers at {base_url} (from the argument or DOCKER_HOST): {reason}. "
            + _START_ENGINE_HINT
        )
        self.base_url = base_url


class PythonImageError(DockerEngineError):
    """The Python test image could not be built or used.

    Attributes:
        tag: The image tag.
    """

    def __init__(self, message: str, *, tag: str) -> None:
        super().__init__(message)
        self.tag = tag


class PythonVersionMismatch(PythonImageError):
    """The image's Python minor version differs from the host's, so pickled code would not load.

    Attributes:
        tag: The image tag.
        image_version: ``(major, minor)`` of ``python3`` in the image.
        host_version: ``(major, minor)`` of the Python running this process.
    """

    def __init__(self, tag: str, image_version: tuple[int, int], host_version: tuple[int, int]) -> None:
        image, host = ".".join(map(str, image_version)), ".".join(map(str, host_version))
        super().__init__(
            f"Image {tag} runs Python {image} but this host runs Python {host}; code pickled on the "
            f"host needs the same minor version in the container. Rebuild the image from a "
            f"distribution release with Python {host}: `docker rmi {tag}` then "
            f"`python -m prefect_mig.launchers.images ensure-image --tag {tag} --suite SUITE "
            f"--mirror URL` (e.g. --suite noble --mirror http://archive.ubuntu.com/ubuntu for 3.12), "
            f"or run the tests with a Python {image} virtual environment.",
            tag=tag,
        )
        self.image_version = image_version
        self.host_version = host_version


class ContainerFailed(DockerEngineError):
    """A throwaway container exited with a non-zero status.

    Attributes:
        image: The image it ran.
        exit_code: Its exit status.
        output: Its combined stdout and stderr.
    """

    def __init__(self, image: str, exit_code: int, output: str) -> None:
        super().__init__(f"A container of {image} exited with status {exit_code}:\n{output.strip()}")
        self.image = image
        self.exit_code = exit_code
        self.output = output


def docker_client(base_url: str | None = None) -> docker.DockerClient:
    """Connect to a Docker engine and check that it answers.

    Args:
        base_url: The engine's address, e.g. ``unix:///var/run/docker.sock``. ``None`` uses the
            environment (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``) as ``docker``
            does.

    Returns:
        A client whose engine answered ``ping``.

    Raises:
        DockerEngineUnavailable: When nothing answers; the message says how to start an engine.

    Examples:
        ```python
        from prefect_mig.launchers.images import docker_client

        client = docker_client()  # or docker_client("unix:///var/run/docker.sock")
        assert client.ping()
        ```
    """
    url = base_url or kwargs_from_env().get("base_url") or _DEFAULT_SOCKET
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise DockerEngineUnavailable(url, str(exc)) from exc
    return client


def ensure_python_image(
    client: docker.DockerClient,
    tag: str = DEFAULT_IMAGE_TAG,
    *,
    suite: str = DEFAULT_SUITE,
    mirror: str = DEFAULT_MIRROR,
    progress: Callable[[str], object] = print,
) -> str:
    """Return ``tag``, first building the image with ``debootstrap`` if the engine lacks it.

    The build (about a minute, needs root and the distribution mirror) runs ``debootstrap
    --variant=minbase --include=python3 SUITE ROOT MIRROR`` and imports ``ROOT`` as ``tag``. A lock
    file keeps concurrent callers from building twice; an existing tag is reused as is.

    Args:
        client: A connected client, see :func:`docker_client`.
        tag: The image tag to ensure.
        suite: The distribution release to bootstrap (``bookworm`` has Python 3.11).
        mirror: The package mirror for ``debootstrap``.
        progress: Called with a line before each slow step.

    Returns:
        ``tag``.

    Raises:
        PythonImageError: When ``debootstrap`` is missing, this process is not root, or the build fails.
    """
    if _image_exists(client, tag):
        return tag
    with _build_lock(tag):
        if _image_exists(client, tag):  # built by another process while we waited
            return tag
        _build_python_image(client, tag, suite=suite, mirror=mirror, progress=progress)
    return tag


def run_python(
    client: docker.DockerClient,
    image: str,
    code: str,
    *,
    labels: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> str:
    """Run ``python3 -c code`` in a throwaway container with networking disabled.

    Args:
        client: A connected client.
        image: The image to run, e.g. the tag from :func:`ensure_python_image`.
        code: Python source passed to ``python3 -c``.
        labels: Extra container labels; :data:`CONTAINER_LABEL` is always set.
        timeout: Seconds to wait for the container to exit.

    Returns:
        The container's stdout and stderr, decoded.

    Raises:
        ContainerFailed: When the code exits with a non-zero status.

    Examples:
        ```python
        from prefect_mig.launchers.images import docker_client, ensure_python_image, run_python

        client = docker_client()
        output = run_python(client, ensure_python_image(client), "print(6 * 7)")
        assert output.strip() == "42"
        ```
    """
    container = client.containers.create(
        image,
        ["python3", "-c", code],
        network_disabled=True,
        labels={CONTAINER_LABEL: "1", **(labels or {})},
    )
    try:
        container.start()
        exit_code = container.wait(timeout=timeout)["StatusCode"]
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    if exit_code != 0:
        raise ContainerFailed(image, exit_code, output)
    return output


def image_python_version(client: docker.DockerClient, tag: str) -> tuple[int, int]:
    """Return ``(major, minor)`` of ``python3`` in image ``tag``."""
    output = run_python(client, tag, "import sys; print(tuple(sys.version_info[:2]))")
    major, minor = ast.literal_eval(output.strip().splitlines()[-1])
    return int(major), int(minor)


def check_python_matches(client: docker.DockerClient, tag: str) -> tuple[int, int]:
    """Check that image ``tag`` runs the host's Python minor version and return that version.

    Raises:
        PythonVersionMismatch: When the versions differ; the message says how to rebuild.
    """
    image_version = image_python_version(client, tag)
    host_version = (sys.version_info.major, sys.version_info.minor)
    if image_version != host_version:
        raise PythonVersionMismatch(tag, image_version, host_version)
    return image_version


# -- building the image -----------------------------------------------------------------------------


def _image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _build_lock(tag: str):
    from prefect_mig.allocator.embedded import state_lock

    safe_tag = "".join(c if c.isalnum() else "_" for c in tag)
    return state_lock(Path(tempfile.gettempdir()), f"prefect-mig-image-{safe_tag}")


def _build_python_image(
    client: docker.DockerClient,
    tag: str,
    *,
    suite: str,
    mirror: str,
    progress: Callable[[str], object],
) -> None:
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        raise PythonImageError(
            f"Image {tag} is missing and building it needs debootstrap, which is not installed. "
            "Install the `debootstrap` package (`sudo bash .ci/install-system`).",
            tag=tag,
        )
    if os.geteuid() != 0:
        raise PythonImageError(
            f"Image {tag} is missing and building it with debootstrap needs root. Run "
            "`sudo .venv/bin/python -m prefect_mig.launchers.images ensure-image` once.",
            tag=tag,
        )
    # /var/tmp, not /tmp: the root file system is ~260 MB and /tmp may be a small tmpfs.
    work = Path(tempfile.mkdtemp(prefix="prefect-mig-rootfs-", dir="/var/tmp"))
    try:
        root, log_path, tar_path = work / "root", work / "debootstrap.log", work / "root.tar"
        progress(f"Building {tag}: debootstrap {suite} with python3 from {mirror} (about a minute)")
        started = time.monotonic()
        with open(log_path, "wb") as log:
            result = subprocess.run(
                [debootstrap, "--variant=minbase", "--include=python3", suite, str(root), mirror],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise PythonImageError(
                f"debootstrap {suite} from {mirror} failed with status {result.returncode} while "
                f"building {tag}; check that the mirror is reachable. Last lines of its log:\n{tail}",
                tag=tag,
            )
        progress(f"Building {tag}: importing the root file system into the engine")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tar_path), "."], check=True)
        repository, _, image_tag = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
        client.api.import_image(
            src=str(tar_path),
            repository=repository,
            tag=image_tag,
            changes=["ENV LANG=C.UTF-8", 'CMD ["python3"]'],
        )
        progress(f"Built {tag} in {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m prefect_mig.launchers.images``."""
    parser = argparse.ArgumentParser(prog="python -m prefect_mig.launchers.images")
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser(
        "ensure-image", help="build the Python test image if missing and check its Python version"
    )
    ensure.add_argument("--tag", default=DEFAULT_IMAGE_TAG)
    ensure.add_argument("--suite", default=DEFAULT_SUITE, help="distribution release for debootstrap")
    ensure.add_argument("--mirror", default=DEFAULT_MIRROR, help="package mirror for debootstrap")
    args = parser.parse_args(argv)
    try:
        client = docker_client()
        tag = ensure_python_image(client, args.tag, suite=args.suite, mirror=args.mirror)
        major, minor = check_python_matches(client, tag)
    except DockerEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{tag} python {major}.{minor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
