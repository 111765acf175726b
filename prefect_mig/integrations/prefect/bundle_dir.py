"""Bundle and result storage for ``@mig`` flows in a directory that the callers and the flow-run
containers share (a host path on one machine, an NFS mount on several), for clusters without an
object store. Prefect ships an infrastructure-bound flow to its container as a *bundle*: the caller
uploads it with the pool's upload step, the container runs the pool's execution step, and the
result comes back through the pool's result storage.

Configure a ``mig-docker`` pool once (Python, against the pool's Prefect API)::

    from prefect_mig.integrations.prefect.bundle_dir import use_directory_storage

    use_directory_storage("gpu", "/srv/prefect-mig/shared")

and mount the directory into the flow-run containers at the same path (job variable ``volumes``:
``["/srv/prefect-mig/shared:/srv/prefect-mig/shared"]``). The upload step runs on the caller with
its Python (``python -m prefect_mig.integrations.prefect.bundle_dir``: a copy into
``<dir>/bundles``); the execution step needs only Prefect in the image
(``python3 -m prefect.bundles.execute``; the worker runs it in that directory); results are
written by a ``LocalFileSystem`` block under ``<dir>/results``. With an object store use Prefect's own
``prefect work-pool storage configure s3|gcs|azure`` instead.

Examples:
    ```python
    from prefect_mig.integrations.prefect.bundle_dir import storage_steps

    upload, execute = storage_steps("/srv/shared", python="/usr/bin/python3")
    assert upload["prefect_mig.integrations.prefect.bundle_dir"]["directory"] == "/srv/shared/bundles"
    assert execute == {"prefect.bundles.execute": {"launcher": ["python3"]}}
    ```
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

_MODULE = "prefect_mig.integrations.prefect.bundle_dir"


def storage_steps(directory: str, *, python: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pool's bundle upload and execution steps for shared `directory` (absolute)."""
    bundles = str(Path(directory) / "bundles")
    upload = {_MODULE: {"launcher": [python or sys.executable], "directory": bundles}}
    # `python3 -m prefect.bundles.execute --key <key>`: the key is relative to the bundle directory,
    # which the worker makes the container's working directory (`bundle_directory`)
    execute = {"prefect.bundles.execute": {"launcher": ["python3"]}}
    return upload, execute


def bundle_directory(storage_configuration: Any) -> str | None:
    """The shared bundle directory of a pool configured by `use_directory_storage`, else None."""
    step = getattr(storage_configuration, "bundle_upload_step", None) or {}
    directory = (step.get(_MODULE) or {}).get("directory")
    return directory if isinstance(directory, str) else None


def use_directory_storage(work_pool: str, directory: str, *, python: str | None = None) -> None:
    """Set `work_pool`'s bundle steps and default result storage to shared `directory`.

    Raises:
        ConfigError: `directory` is not absolute.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.objects import WorkPoolStorageConfiguration
    from prefect.filesystems import LocalFileSystem

    from prefect_mig.errors import ConfigError

    if not Path(directory).is_absolute():
        raise ConfigError(f"directory={directory!r} must be an absolute path (the containers mount it at the same path).",
                          field="directory", value=directory)
    for sub in ("bundles", "results"):
        Path(directory, sub).mkdir(parents=True, exist_ok=True)
    block_id = LocalFileSystem(basepath=str(Path(directory) / "results")).save(f"{work_pool}-results", overwrite=True)
    upload, execute = storage_steps(directory, python=python)
    with get_client(sync_client=True) as client:
        client.update_work_pool(work_pool, WorkPoolUpdate(storage_configuration=WorkPoolStorageConfiguration(
            bundle_upload_step=upload, bundle_execution_step=execute, default_result_storage_block_id=block_id,
        )))


def main(argv: list[str] | None = None) -> None:
    """The upload step: copy the bundle file `key` (in the working directory) into ``--directory``."""
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    parser.add_argument("--directory", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("path", nargs="?")
    args = parser.parse_args(argv)
    target = Path(args.directory) / args.key
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.path or args.key, target)


if __name__ == "__main__":
    main()
