"""Create the default ``mig-cluster`` block document from the ``PREFECT_MIG_*`` settings.

    python blocks/create_defaults.py [NAME]        # NAME defaults to "default"

It registers the block type first (as ``prefect block register -m prefect_mig.blocks`` does), so
the block appears in the Prefect UI under Blocks -> MIG Cluster.
"""

from __future__ import annotations

import sys

from prefect_mig.allocator.embedded import redis_url
from prefect_mig.blocks import MigCluster
from prefect_mig.gpu import default_gpu_runtime
from prefect_mig.settings import load_settings


def create_default(name: str = "default") -> MigCluster:
    settings = load_settings()
    MigCluster.register_type_and_schema()
    block = MigCluster(
        redis_url=redis_url(settings),
        namespace=settings.namespace,
        docker_host=settings.docker_host,
        gpu_runtime=default_gpu_runtime(settings),
    )
    block.save(name, overwrite=True)
    return block


if __name__ == "__main__":
    made = create_default(sys.argv[1] if len(sys.argv) > 1 else "default")
    print(f"saved mig-cluster/{sys.argv[1] if len(sys.argv) > 1 else 'default'} (namespace {made.namespace})")
