"""What goes into a task container besides the call, and what the image must have.

The runtime is ``entry.py`` (``runtime_entry.py``), the host's pure-Python ``cloudpickle`` and
``tblib`` under ``site/``, ``runtime_shim.py``: a stand-in for the few Prefect names a body may
use in an image without Prefect, and ``runtime_prefect.py``: Prefect's own run context for a body in
an image with Prefect. The image needs only ``python3`` of the flow's minor version.

Examples:
    ```python
    from prefect_mig.launchers.runtime import runtime_files, runtime_packages

    assert [m.__name__ for m in runtime_packages()] == ["cloudpickle", "tblib"]
    assert set(runtime_files()) == {"runtime_shim.py", "runtime_prefect.py"}
    ```
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import cloudpickle
import docker
import docker.errors
import tblib

from prefect_mig.errors import ImageWithoutPython

_HERE = Path(__file__).parent


def runtime_packages() -> list[ModuleType]:
    """Pure-Python packages copied from this process into the container's ``site/``."""
    return [cloudpickle, tblib]


def runtime_files() -> dict[str, bytes]:
    """Files copied next to the payload (names relative to the runtime's home)."""
    return {name: (_HERE / name).read_bytes() for name in ("runtime_shim.py", "runtime_prefect.py")}  # entry.py: DockerLauncher


def probe_python(client: docker.DockerClient, image_id: str, image: str) -> tuple[int, int]:
    """The image's ``python3`` (major, minor); an image without one gets `ImageWithoutPython`."""
    from prefect_mig.launchers.images import image_python_version

    try:
        return image_python_version(client, image_id)
    except docker.errors.APIError as exc:
        if "executable file not found" not in str(exc) and "no such file" not in str(exc).lower():
            raise
        raise ImageWithoutPython(
            f"image {image!r} has no python3 on its PATH ({exc.explanation or exc}); task bodies run "
            "with the image's python3. Use an image with python3 of the flow's minor version, e.g. "
            "prefect-mig-python:bookworm (`make image`).",
            image=image,
        ) from exc


def remove_launched(client: docker.DockerClient, launch_id: str, *, within_s: float = 10.0) -> None:
    """Remove the container of one launch (label ``prefect-mig.launch-id``), if the engine made it.

    Called when an exception raised into the creating thread (a Ctrl-C of a launcher used directly
    in the main thread) cut a create request short: the engine may still be making the
    container after this client stopped listening, so it looks again until one is found and
    removed or `within_s` has passed. An engine error on the way (a conflict while the engine
    still makes or removes it, a busy file system) is tried again until then too; best effort:
    the agent's fencing removes what is left."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        removed = False
        try:
            found = client.containers.list(all=True, ignore_removed=True,
                                           filters={"label": f"prefect-mig.launch-id={launch_id}"})
            for container in found:
                try:
                    container.remove(force=True, v=True)
                except docker.errors.NotFound:  # gone between the look and the removal
                    pass
            removed = bool(found)
        except docker.errors.APIError:
            pass  # look again
        except docker.errors.DockerException:
            return
        if removed or time.monotonic() >= deadline:
            return
        time.sleep(0.2)
