"""Build an image that can run a whole flow run (``prefect flow-run execute``) for the ``mig-docker``
worker, offline: the local Python image (``prefect-mig-python:bookworm``, see `images`) plus wheels
downloaded on the host with pip (from whatever index pip is configured with) and unpacked into the
image's ``dist-packages``. No container needs a network and no registry is pulled from.

The wheels must suit the image's Python: they are downloaded for its minor version as binaries
only, for the host's platform (the image is Debian on the host's architecture).

In production, use ``prefecthq/prefect:3-python3.11`` plus your code (a Dockerfile, or
``prefect_docker.deployments.steps.build_docker_image`` in ``prefect.yaml``) instead.

Examples:
    ```python
    from prefect_mig.launchers.flow_image import console_script

    assert "from prefect.cli import app" in console_script("prefect.cli:app")
    ```
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from configparser import ConfigParser
from pathlib import Path

import docker
import docker.errors

from prefect_mig.errors import ConfigError, ImageNotFound, LaunchError
from prefect_mig.launchers.images import CONTAINER_LABEL, DEFAULT_IMAGE_TAG, image_python_version

DEFAULT_FLOW_IMAGE_TAG = "prefect-mig-flow:latest"


def default_requirements() -> list[str]:
    """The host's Prefect version: what a flow run's engine in the container needs."""
    import prefect

    return [f"prefect=={prefect.__version__}"]


def _prefect_version(wheels: list[Path]) -> str:
    """The version of the Prefect wheel among `wheels` (a label of the image), or ''."""
    names = [w.name.split("-") for w in wheels]
    return next((parts[1] for parts in names if parts[0] == "prefect"), "")


def console_script(target: str) -> str:
    """The text of a ``console_scripts`` launcher for ``module:attr``."""
    module, _, attr = target.partition(":")
    head = attr.split(".")[0]
    return (
        "#!/usr/bin/python3\nimport sys\n"
        f"from {module} import {head}\n"
        f"sys.exit({attr}())\n"
    )


def _wheel_tar(wheels: list[Path], site: str) -> bytes:
    """A tar of the unpacked wheels (rooted at /) plus their console scripts in /usr/local/bin."""
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, now
            tar.addfile(info, io.BytesIO(data))

        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for item in zf.infolist():
                    if item.is_dir():
                        continue
                    name = item.filename
                    parts = name.split("/")
                    if parts[0].endswith(".data") and len(parts) > 2:
                        kind, rest = parts[1], "/".join(parts[2:])
                        target = f"usr/local/bin/{rest}" if kind == "scripts" else f"{site}/{rest}"
                        add(target, zf.read(item), 0o755 if kind == "scripts" else 0o644)
                        continue
                    add(f"{site}/{name}", zf.read(item))
                    if parts[0].endswith(".dist-info") and parts[-1] == "entry_points.txt":
                        points = ConfigParser(interpolation=None, delimiters=("=",))
                        points.optionxform = str  # type: ignore[assignment,method-assign]
                        points.read_string(zf.read(item).decode())
                        if points.has_section("console_scripts"):
                            for script, target in points.items("console_scripts"):
                                add(f"usr/local/bin/{script.strip()}", console_script(target.strip()).encode(), 0o755)
    return buf.getvalue()


def download_wheels(requirements: list[str], dest: Path, python: tuple[int, int], on_log: Callable[[str], None] = print) -> list[Path]:
    """``pip download`` the requirements and their dependencies as wheels for `python` into `dest`."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), "--only-binary=:all:",
               "--python-version", f"{python[0]}.{python[1]}", *requirements]
    on_log(f"downloading wheels: {' '.join(requirements)}")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        errors = "\n".join(line for line in done.stderr.splitlines() if "is ignored" not in line)[-2000:]
        raise ConfigError(
            f"pip could not download wheels for Python {python[0]}.{python[1]} of {requirements}:\n{errors}\n"
            "Check the requirements and pip's index (pip.conf), or give --wheels DIR with the wheels.",
            field="requirements", value=requirements,
        )
    return sorted(dest.glob("*.whl"))


def build_flow_image(
    tag: str = DEFAULT_FLOW_IMAGE_TAG,
    *,
    base: str = DEFAULT_IMAGE_TAG,
    requirements: list[str] | None = None,
    wheels: list[Path] | None = None,
    client: docker.DockerClient | None = None,
    on_log: Callable[[str], None] = print,
) -> str:
    """Build `tag` from `base` plus the wheels of `requirements` (default: the host's Prefect) and
    the given local `wheels` (your own code, built with ``pip wheel . --no-deps``); the image id.

    Raises:
        ImageNotFound: `base` is not on the engine (``make image`` builds the default one).
        ConfigError: pip could not download the requirements.
    """
    client = client or docker.from_env()
    try:
        client.images.get(base)
    except docker.errors.ImageNotFound as exc:
        raise ImageNotFound(
            f"base image {base!r} is not on the Docker engine; build it with `make image` "
            "(prefect-mig-python:bookworm) or give --base an image with python3.", image=base,
        ) from exc
    python = image_python_version(client, base)
    site = f"usr/local/lib/python{python[0]}.{python[1]}/dist-packages"
    with tempfile.TemporaryDirectory(prefix="prefect-mig-wheels-") as tmp:
        found = download_wheels(list(requirements if requirements is not None else default_requirements()), Path(tmp), python, on_log)
        found += [Path(w) for w in wheels or []]
        on_log(f"unpacking {len(found)} wheels into {base} -> {tag}")
        archive = _wheel_tar(found, site)
    # compiled once here: a task container's root is read-only, so otherwise every container would
    # compile Prefect's sources again on import (about 20 s on a loaded 2-core machine)
    compile_all = ["python3", "-m", "compileall", "-q", "-j", "0", f"/{site}"]
    container = client.containers.create(base, command=compile_all, network_disabled=True, labels={CONTAINER_LABEL: "flow-image"})
    try:
        if not container.put_archive("/", archive):
            raise LaunchError(f"could not copy the wheels into a container of {base!r}", image=base)
        container.start()
        container.wait(timeout=600)  # not its status: a few packages ship files for newer Pythons, left uncompiled
        repository, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
        image = container.commit(repository=repository, tag=version, changes=['CMD ["prefect", "version"]'],
                                 conf={"Labels": {"prefect-mig.flow-image": "2", "prefect-mig.prefect-version": _prefect_version(found)}})
    finally:
        container.remove(force=True)
    on_log(f"built {tag} ({image.short_id})")
    return image.id
