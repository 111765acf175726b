"""``prefect-mig image build``: an image that runs a whole flow run for the ``mig-docker`` worker,
built offline from the local Python image plus wheels downloaded on the host (see
`prefect_mig.launchers.flow_image`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prefect_mig.launchers.flow_image import DEFAULT_FLOW_IMAGE_TAG
from prefect_mig.launchers.images import DEFAULT_IMAGE_TAG

image_app = typer.Typer(help="Images for the mig-docker worker's flow runs.", no_args_is_help=True)


@image_app.command("build")
def build(
    tag: Annotated[str, typer.Option("--tag", help="The image to build.")] = DEFAULT_FLOW_IMAGE_TAG,
    base: Annotated[str, typer.Option("--base", help="An image with python3 (`make image` builds the default).")] = DEFAULT_IMAGE_TAG,
    requirement: Annotated[Optional[list[str]], typer.Option(
        "--with", help="A requirement to install (repeatable); default: the host's prefect version.")] = None,
    wheel: Annotated[Optional[list[Path]], typer.Option(
        "--wheel", exists=True, dir_okay=False, help="A local wheel to add, e.g. your flows' package (repeatable).")] = None,
) -> None:
    """Build TAG from BASE plus Prefect (and --with / --wheel) unpacked from wheels pip downloads on
    this host; no container needs a network. Use it as the pool's or deployment's `image` job variable."""
    from prefect_mig.launchers.flow_image import build_flow_image, default_requirements

    build_flow_image(tag, base=base, requirements=default_requirements() + list(requirement or []), wheels=list(wheel or []))
