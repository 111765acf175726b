"""Task overhead: the same cloudpickled body as a MigTaskRunner task, as a bare container run through
the docker SDK, and as a ThreadPoolTaskRunner task, in one run.

- (a) ``mig_task_s``: a ``@task(task_runner=MigTaskRunner(...))`` call inside a flow, end to end:
  lease, container bound to the slice, outcome back, release.
- (b) ``bare_docker_s``: what any container launch of that body needs, with the docker SDK alone:
  create, ``put_archive`` (runtime + payload), start, wait, ``get_archive``, remove.
- (c) ``threadpool_task_s``: the body as an ordinary Prefect task in the thread pool.
- (d) ``warm_task_s``: the same task with ``MigTaskRunner(keep_warm_s=...)``: after the first call,
  each runs in the warm process on the still-leased slice (no container start, no lease).
- (e) ``big_arg_mig_task_s`` / ``big_arg_bare_docker_s``: (a) and (b) again with a body that takes
  ``--arg-mb`` MB of bytes (default 8) and returns its length: what large task arguments cost
  beyond the container run that any launch of them needs.
- (f) ``big_flow_param_mig_task_s`` / ``big_flow_param_warm_task_s``: (a) and (d) again inside a flow
  run one of whose parameters is a list of ints of about ``--flow-param-mb`` MB as JSON (default
  8; the bench's own Prefect server is started with ``PREFECT_SERVER_API_MAX_PARAMETER_SIZE=0``, as
  a server must be for flow parameters over 512 KB): what a large flow parameter costs each MIG
  task of that flow run.
- ``map100_cold_s`` / ``map100_warm_s``: a 100-task map over 3 slices, cold and warm; and
  ``map100_heavy_import_cold_s`` / ``..._warm_s``: the same with a body that imports a module taking
  2 s to import (a stand-in for ``import torch``; an image built FROM the test image with it).

Targets: (a)/(b) <= 1.15, and (e) the same; (f) within noise of (a) and (d); warm overhead over the thread pool (``warm_overhead_vs_threadpool_s``)
<= 25 ms per task; ``map100_warm_s`` <= 0.2x ``map100_cold_s``; with the heavy import <= 0.1x.
Usage: ``.venv/bin/python bench/task_overhead.py [--quick] [--no-map]``; the last line is one JSON
object.
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
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a loaded machine
os.environ.setdefault("PREFECT_SERVER_API_MAX_PARAMETER_SIZE", "0")  # (f): a server refuses flow parameters over 512 KB by default

import docker  # noqa: E402
import redis  # noqa: E402
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


def timed(into: list[float], fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    into.append(time.perf_counter() - started)
    return value


def sized(blob: bytes) -> int:
    return len(blob)


def bare_docker(client: docker.DockerClient, fn=body, arg=3) -> float:
    started = time.perf_counter()
    # the runtime archive is laid out relative to HOME, a volume of the container's own (as the launcher does)
    container = client.containers.create(IMAGE, ["python3", f"{HOME}/entry.py"], network_disabled=True, detach=True,
                                         environment={"CUDA_VISIBLE_DEVICES": "MIG-bench"},
                                         mounts=[Mount(HOME, None, type="volume")])
    try:
        container.put_archive(HOME, _runtime_archive(_pickle_call(fn, (arg,), {})))
        container.start()
        container.wait()
        stream, _ = container.get_archive(f"{HOME}/result.pkl")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractfile("result.pkl").read()
    finally:
        container.remove(force=True, v=True)
    return time.perf_counter() - started


HEAVY_IMAGE = "prefect-mig-bench-heavy:latest"
SLICES = "1g.10gb@0 + 1g.10gb@1 + 1g.10gb@2"


def heavy_body(x: int) -> int:
    import heavy_stub  # 2 s to import, once per process

    return heavy_stub.work(x)


def heavy_image(client: docker.DockerClient) -> str:
    """The test image plus a module that takes 2 s to import (built locally, no registry)."""
    files = {
        "Dockerfile": f"FROM {IMAGE}\nCOPY heavy_stub.py /usr/lib/python3/dist-packages/heavy_stub.py\n".encode(),
        "heavy_stub.py": b"import time\ntime.sleep(2)\n\ndef work(x):\n    return x * 2\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=HEAVY_IMAGE, rm=True)
    return HEAVY_IMAGE


def map100(fn, image: str, keep_warm_s: float, namespace: str, url: str, n: int = 100) -> float:
    """Seconds for an n-task map over 3 1g slices, each task leasing one (cold or warm)."""
    from prefect_mig.launchers.warm_pool import POOL

    Allocator(redis.Redis.from_url(url), namespace).publish_fleet("n=1xH100-80GB", layouts={"n": [SLICES]}, heartbeat_ttl_s=3600)
    os.environ["PREFECT_MIG_NAMESPACE"] = namespace
    mapped = task(task_runner=MigTaskRunner(profile="1g.10gb", image=image, keep_warm_s=keep_warm_s, max_workers=8))(fn)

    @flow
    def fan_out() -> float:
        t0 = time.perf_counter()
        results = [f.result() for f in mapped.map(range(n))]
        assert len(results) == n
        return time.perf_counter() - t0

    try:
        return fan_out()
    finally:
        POOL.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-map", action="store_true", help="skip the 100-task maps (minutes with the heavy import)")
    parser.add_argument("--arg-mb", type=float, default=8.0, help="the large argument's size for (e), in MB")
    parser.add_argument("--flow-param-mb", type=float, default=8.0, help="the large flow parameter's size for (f), MB of JSON")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    client = docker.from_env()
    ensure_python_image(client)

    mig_body = task(task_runner=MigTaskRunner(profile="7g.80gb", image=IMAGE))(body)
    warm_body = task(task_runner=MigTaskRunner(profile="7g.80gb", image=IMAGE, keep_warm_s=120))(body)
    pool_body = prefect_task(body)
    big_body = task(task_runner=MigTaskRunner(profile="7g.80gb", image=IMAGE))(sized)
    blob = bytes(int(args.arg_mb * 1_000_000))

    with RedisServer() as server:
        os.environ.update(PREFECT_MIG_REDIS_URL=server.url, PREFECT_MIG_NAMESPACE="bench")
        # two slices: the warm task (d) keeps one; with one, (a) would ask it back every round
        Allocator(server.client(), "bench").publish_fleet("n=2xH100-80GB", layouts={"n": ["7g.80gb@0", "7g.80gb@0"]}, heartbeat_ttl_s=3600)

        @flow
        def measure(n: int) -> tuple[list[float], list[float], list[float], list[float]]:
            a, b, c, d = [], [], [], []
            mig_body(3), pool_body(3), bare_docker(client), warm_body(3)  # warm up (d: its process)
            for _ in range(n):  # interleaved, so machine noise hits all four alike
                t0 = time.perf_counter()
                mig_body(3)
                a.append(time.perf_counter() - t0)
                b.append(bare_docker(client))
                t0 = time.perf_counter()
                pool_body(3)
                c.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                warm_body(3)
                d.append(time.perf_counter() - t0)
            return a, b, c, d

        @flow
        def measure_big(n: int) -> tuple[list[float], list[float]]:
            e, f = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                assert big_body(blob) == len(blob)
                e.append(time.perf_counter() - t0)
                f.append(bare_docker(client, sized, blob))
            return e, f

        @flow
        def measure_flow_param(numbers: list, n: int) -> tuple[list[float], list[float]]:
            g, h = [], []
            warm_body(3)  # its process
            for _ in range(n):
                timed(g, mig_body, 3)
                timed(h, warm_body, 3)
            return g, h

        from prefect_mig.launchers.warm_pool import POOL

        try:
            a, b, c, d = measure(rounds)
        finally:
            POOL.close()
        e, f = measure_big(max(3, rounds // 3))
        numbers = list(range(int(args.flow_param_mb * 1_000_000 / 7)))  # about 7 characters each as JSON
        param_mb = len(json.dumps(numbers)) / 1e6
        try:
            g, h = measure_flow_param(numbers, rounds)
        finally:
            POOL.close()
        flow_mig, flow_warm = statistics.median(g), statistics.median(h)
        mig, bare, pool, warm, big, big_bare = (statistics.median(x) for x in (a, b, c, d, e, f))
        table = Table(title=f"per-task time, median of {rounds}")
        for col in ("run", "seconds", "vs bare docker"):
            table.add_column(col)
        table.add_row("(a) MigTaskRunner task", f"{mig:.3f}", f"{mig / bare:.2f}x (target <= 1.15)")
        table.add_row("(b) bare docker SDK run", f"{bare:.3f}", "1.00x")
        table.add_row("(c) ThreadPoolTaskRunner task", f"{pool:.4f}", f"{pool / bare:.3f}x")
        table.add_row("(d) warm MigTaskRunner task", f"{warm:.4f}",
                      f"{warm / bare:.3f}x; {1000 * (warm - pool):.1f} ms over (c) (target <= 25 ms)")
        table.add_row(f"(e) (a) with a {args.arg_mb:g} MB argument", f"{big:.3f}", f"{big / big_bare:.2f}x its bare run (target <= 1.15)")
        table.add_row(f"(e) (b) with a {args.arg_mb:g} MB argument", f"{big_bare:.3f}", "1.00x")
        table.add_row(f"(f) (a) in a flow run with a {param_mb:.1f} MB parameter", f"{flow_mig:.3f}", f"{flow_mig / mig:.2f}x (a)")
        table.add_row(f"(f) (d) in a flow run with a {param_mb:.1f} MB parameter", f"{flow_warm:.4f}",
                      f"{1000 * (flow_warm - warm):.1f} ms over (d)")
        console.print(table)
        maps: dict[str, float] = {}
        if not args.no_map:
            n = 30 if args.quick else 100
            heavy = heavy_image(client)
            maps["map100_cold_s"] = map100(body, IMAGE, 0, "bench-map-cold", server.url, n)
            maps["map100_warm_s"] = map100(body, IMAGE, 60, "bench-map-warm", server.url, n)
            maps["map100_heavy_import_cold_s"] = map100(heavy_body, heavy, 0, "bench-heavy-cold", server.url, n)
            maps["map100_heavy_import_warm_s"] = map100(heavy_body, heavy, 60, "bench-heavy-warm", server.url, n)
    if maps:
        table = Table(title=f"{30 if args.quick else 100}-task map over 3 slices")
        for col in ("body", "cold s", "warm s", "warm / cold"):
            table.add_column(col)
        for label, key, target in (("small", "map100", 0.2), ("2 s import", "map100_heavy_import", 0.1)):
            cold, hot = maps[f"{key}_cold_s"], maps[f"{key}_warm_s"]
            table.add_row(label, f"{cold:.2f}", f"{hot:.2f}", f"{hot / cold:.3f} (target <= {target})")
        console.print(table)
    print(json.dumps({"mig_task_s": round(mig, 4), "bare_docker_s": round(bare, 4), "threadpool_task_s": round(pool, 5),
                      "ratio_vs_bare_docker": round(mig / bare, 3), "warm_task_s": round(warm, 5),
                      "warm_overhead_vs_threadpool_s": round(warm - pool, 5), "map_tasks": 30 if args.quick else 100,
                      "big_arg_mb": args.arg_mb, "big_arg_mig_task_s": round(big, 4), "big_arg_bare_docker_s": round(big_bare, 4),
                      "big_arg_ratio_vs_bare_docker": round(big / big_bare, 3), "flow_param_mb": round(param_mb, 2),
                      "big_flow_param_mig_task_s": round(flow_mig, 4), "big_flow_param_warm_task_s": round(flow_warm, 5),
                      **{k: round(v, 3) for k, v in maps.items()}}))


if __name__ == "__main__":
    main()
