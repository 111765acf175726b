"""A flow that runs whole on one MIG slice: deploy it to a ``mig-docker`` pool (see ``prefect.yaml``
and the README's "Deploy and run from the Prefect UI"); the worker leases the slice, and the flow
run's container sees only it.

    prefect deploy --name on-a-slice
"""

from __future__ import annotations

import os

from prefect import flow


@flow(name="train-on-a-slice", log_prints=True)
def train_on_a_slice(epochs: int = 3) -> str:
    """Train for `epochs` on the MIG device the worker bound the container to; return its UUID."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
    for epoch in range(1, epochs + 1):
        print(f"epoch {epoch}/{epochs} on {device}")
    return device


if __name__ == "__main__":
    print(train_on_a_slice())
