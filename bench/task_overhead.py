"""Task overhead: the same cloudpickled body as a MigTaskRunner task, as a bare container run through
the docker SDK, and as a ThreadPoolTaskRunner task, in one run.

- (a) ``mig_task_s``: a ``@task(task_runner=MigTaskRunner(...))`` call inside a flow, end to end:
  lease, container bound to the slice, outcome back, release.
- (b) ``bare_docker_s``: what any container launch of that body needs, with the docker SDK alone:
  create, ``put_archive`` (runtime + payload), start, wait, ``get_archive``, remove.
- (c) ``threadpool_task_s``: the body as an ordinary Prefect task in the thread pool.

Target: (a)/(b) <= 1.15. Usage: ``.venv/bin/python bench/task_overhead.py [--quick]``; the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import docker  # noqa: E402
from docker.types import Mount  # noqa: E402
from prefect import flow  # noqa: E402
from prefect import task as prefect_task  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from prefect_mig import MigTaskRunner, task  # noqa: E402
from prefect_mig.allocator import Allocator  # noqa: E402
from prefect_mig.launchers.docker import HOME, _pickle_call, _runtime_archive  # noqa: E402
from prefect_mig.launchers.images import ensure_python_image  # noqa: E402
from prefect_mig.testing.redis_server import RedisServer  # noqa: E402

console = Console()
IMAGE = "prefect-mig-python:bookworm"


def body(x: int) -> int:
    return sum(i * x for i in range(10_000))


def bare_docker(client: docker.DockerClient) -> float:
    started = time.perf_counter()
    # the runtime archive is laid out relative to HOME, a volume of the container's own (as the launcher does)
    container = client.containers.create(IMAGE, ["python3", f"{HOME}/entry.py"], network_disabled=True, detach=True,
                                         environment={"CUDA_VISIBLE_DEVICES": "MIG-bench"},
                                         mounts=[Mount(HOME, None, type="volume")])
    try:
        container.put_archive(HOME, _runtime_archive(_pickle_call(body, (3,), {})))
        container.start()
        container.wait()
        stream, _ = container.get_archive(f"{HOME}/result.pkl")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractfile("result.pkl").read()
    finally:
        container.remove(force=True, v=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    client = docker.from_env()
    ensure_python_image(client)

    mig_body = task(task_runner=MigTaskRunner(profile="7g.80gb", image=IMAGE))(body)
    pool_body = prefect_task(body)

    with RedisServer() as server:
        os.environ.update(PREFECT_MIG_REDIS_URL=server.url, PREFECT_MIG_NAMESPACE="bench")
        Allocator(server.client(), "bench").publish_fleet("n=1xH100-80GB", layouts={"n": ["7g.80gb@0"]})

        @flow
        def measure(n: int) -> tuple[list[float], list[float], list[float]]:
            a, b, c = [], [], []
            mig_body(3), pool_body(3), bare_docker(client)  # warm up
            for _ in range(n):  # interleaved, so machine noise hits all three alike
                t0 = time.perf_counter()
                mig_body(3)
                a.append(time.perf_counter() - t0)
                b.append(bare_docker(client))
                t0 = time.perf_counter()
                pool_body(3)
                c.append(time.perf_counter() - t0)
            return a, b, c

        a, b, c = measure(rounds)
    mig, bare, pool = statistics.median(a), statistics.median(b), statistics.median(c)
    table = Table(title=f"per-task time, median of {rounds}")
    for col in ("run", "seconds", "vs bare docker"):
        table.add_column(col)
    table.add_row("(a) MigTaskRunner task", f"{mig:.3f}", f"{mig / bare:.2f}x (target <= 1.15)")
    table.add_row("(b) bare docker SDK run", f"{bare:.3f}", "1.00x")
    table.add_row("(c) ThreadPoolTaskRunner task", f"{pool:.4f}", f"{pool / bare:.3f}x")
    console.print(table)
    print(json.dumps({"mig_task_s": round(mig, 4), "bare_docker_s": round(bare, 4), "threadpool_task_s": round(pool, 5),
                      "ratio_vs_bare_docker": round(mig / bare, 3)}))


if __name__ == "__main__":
    main()
