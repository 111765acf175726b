"""Workloads for the simulator: jobs read from an Alibaba-2023-format trace, or made up.

A trace pod asks for a share of a GPU of *its* cluster (V100/T4-class), not for a MIG profile, so
every run states a **mapping** from the pod to what it needs of a fleet GPU:

- ``v100`` (default): a trace GPU is a V100 with 16 GB. A pod needs ``16 GB x gpus x share`` of
  memory and ``gpus x share`` V100s of compute; one compute slice of the fleet's model is worth
  `v100_per_slice` V100s: the model's dense FP16 tensor TFLOPS (NVIDIA datasheets,
  `DENSE_FP16_TFLOPS`) over its compute slices, against the V100's 125. On an H100 a slice is
  989 / 7 = 141 TFLOPS (1.13 V100s), so a whole-V100 pod needs 16 GB and one compute slice
  (``1g.20gb`` or bigger), a ``gpu_milli=470`` pod 7.6 GB (``1g.10gb``; needs are rounded up to
  0.1 GB), a 4-GPU pod 64 GB (``7g.80gb``). On an A100 a slice is 312 / 7 = 45 TFLOPS, so a
  whole-V100 pod needs three slices (``3g.40gb``); on an A30, 165 / 4 = 41, so four.
- ``share``: the trace's GPU is the fleet's GPU. A pod needs ``share`` of its compute slices
  (rounded up) and of its memory; a multi-GPU pod needs that many whole GPUs.

**Multi-GPU pods**: a pod whose need is bigger than the fleet model's largest slice is split into
equal parts, each one request for a slice; the pod completes when its last part does. Parts are
leased independently (no gang scheduling), which flatters no policy: every policy sees the same parts.

Pods that ask no GPU, or that the trace never scheduled (no ``scheduled_time``: their run time is
unknown), are skipped. Run time is ``deletion_time - scheduled_time``; arrival is ``creation_time``.
A job's run time does not change with the size of the slice it gets (no speedup model).

Priority from the pod's QoS class: ``LS`` and ``Guaranteed`` 10, ``Burstable`` 5, ``BE`` and
anything else 0.

Examples:
    ```python
    from prefect_mig.simulation.workload import need_of

    assert need_of(num_gpu=1, gpu_milli=1000, mapping="v100", gpu_model="H100-80GB") == [(16.0, 1)]
    assert need_of(num_gpu=1, gpu_milli=470, mapping="v100", gpu_model="H100-80GB") == [(7.6, 1)]
    assert need_of(num_gpu=8, gpu_milli=1000, mapping="v100", gpu_model="H100-80GB") == [(64.0, 4), (64.0, 4)]
    assert need_of(num_gpu=1, gpu_milli=320, mapping="share", gpu_model="H100-80GB") == [(25.6, 3)]
    assert need_of(num_gpu=1, gpu_milli=1000, mapping="v100", gpu_model="A100-80GB") == [(16.0, 3)]
    ```
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect_mig.errors import ConfigError
from prefect_mig.model import SliceRequirement, get_model

Mapping = Literal["v100", "share"]
MAPPINGS: tuple[str, ...] = ("v100", "share")
V100_MEMORY_GB = 16.0
V100_FP16_TFLOPS = 125.0
#: dense (no sparsity) FP16 tensor TFLOPS of the whole GPU, from NVIDIA's datasheets (V100 125,
#: A100 312, A30 165, H100 SXM 989, H100 NVL 835, H200 989, B200 2,250, GB200 2,500). Models not
#: listed scale the H100's figure by their SM count, or take it as is when the catalog has none.
DENSE_FP16_TFLOPS = {
    "A100-40GB": 312.0,
    "A100-80GB": 312.0,
    "A30-24GB": 165.0,
    "H100-80GB": 989.0,
    "H100-94GB": 835.0,
    "GH200-96GB": 989.0,
    "GH200-144GB": 989.0,
    "H200-141GB": 989.0,
    "B200-180GB": 2250.0,
    "GB200-186GB": 2500.0,
    "B300-269GB": 2250.0,
}


def v100_per_slice(gpu_model: str) -> float:
    """V100s of dense FP16 tensor compute one compute slice of `gpu_model` is worth."""
    model = get_model(gpu_model, field="gpu_model")
    tflops = DENSE_FP16_TFLOPS.get(model.name)
    if tflops is None:
        whole = max(model.profiles, key=lambda p: p.compute_slices)
        tflops = DENSE_FP16_TFLOPS["H100-80GB"] * (whole.sm_count / 132 if whole.sm_count else 1.0)
    return tflops / model.compute_slices / V100_FP16_TFLOPS


V100_PER_H100_SLICE = 989 / 7 / 125  # v100_per_slice("H100-80GB"), kept for callers that name it
PRIORITY_BY_QOS = {"LS": 10, "Guaranteed": 10, "Burstable": 5, "BE": 0}
TRACE_COLUMNS = ("name", "num_gpu", "gpu_milli", "qos", "creation_time", "deletion_time", "scheduled_time")


@dataclass(frozen=True)
class Job:
    """One pod: when it arrives, how long it runs, and the slices it needs (one per part)."""

    name: str
    arrival_s: float
    duration_s: float
    parts: tuple[tuple[float, int], ...]  # (min memory GB, min compute slices) per part
    priority: int = 0
    qos: str = "LS"

    def work(self) -> float:
        """Compute-slice seconds the job needs (what the makespan lower bound divides)."""
        return sum(c for _, c in self.parts) * self.duration_s

    def memory_work(self) -> float:
        """GB-seconds of memory the job holds (what the memory lower bound divides)."""
        return sum(m for m, _ in self.parts) * self.duration_s


def _round_up(x: float, step: float = 0.1) -> float:
    return round(math.ceil(round(x / step, 6)) * step, 6)


def need_of(*, num_gpu: int, gpu_milli: int, mapping: str, gpu_model: str) -> list[tuple[float, int]]:
    """The (memory GB, compute slices) parts a trace pod needs on `gpu_model` under `mapping`."""
    if mapping not in MAPPINGS:
        raise ConfigError(f"mapping: {mapping!r} is not a mapping; choose one of {', '.join(MAPPINGS)}.")
    model = get_model(gpu_model, field="gpu_model")
    biggest = max(model.profiles, key=lambda p: (p.compute_slices, p.memory_mib))
    big_gb, big_c = _gb(biggest.name), biggest.compute_slices
    share = gpu_milli / 1000 if num_gpu == 1 else 1.0
    if mapping == "share":
        if num_gpu == 1:
            return [(_round_up(share * big_gb), max(1, math.ceil(round(share * big_c, 6))))]
        return [(big_gb, big_c)] * num_gpu
    memory = V100_MEMORY_GB * num_gpu * share
    compute = num_gpu * share / v100_per_slice(model.name)
    parts = max(math.ceil(round(memory / big_gb, 6)), math.ceil(round(compute / big_c, 6)), 1)
    part = (_round_up(memory / parts), max(1, math.ceil(round(compute / parts, 6))))
    return [part] * parts


def _gb(profile: str) -> float:
    return float(profile.split(".")[1].split("gb")[0])


def best_fit(need: tuple[float, int], gpu_model: str, profiles: Iterable[str] | None = None) -> str:
    """The smallest profile of `gpu_model` (among `profiles`, if given) that holds `need`."""
    model = get_model(gpu_model)
    allowed = None if profiles is None else set(profiles)
    requirement = SliceRequirement(min_memory_gb=need[0], min_compute_slices=need[1])
    for p in sorted(requirement.candidates(model), key=lambda p: (p.memory_mib, p.compute_slices)):
        if allowed is None or p.name in allowed:
            return p.name
    raise ConfigError(f"no profile of {gpu_model} holds {need[0]:g} GB and {need[1]} compute slices.")


def load_trace(
    path: str | Path,
    *,
    mapping: str = "v100",
    gpu_model: str = "H100-80GB",
    start_s: float = 0.0,
    jobs: int | None = None,
    max_duration_s: float | None = None,
) -> list[Job]:
    """Jobs from an Alibaba-2023-format pod list: GPU pods arriving at or after `start_s` (trace
    seconds), the first `jobs` of them, arrivals shifted so the first is at 0, run times capped at
    `max_duration_s` when given.

    Raises:
        ConfigError: the file is missing or lacks a column (names the file and the columns), or a
            value is not what its column holds (names the file, line, column and value).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace: {str(path)!r} is not a file; pass a pod list CSV in the Alibaba 2023 format.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"trace: {str(path)!r} lacks the column(s) {', '.join(missing)}; "
                f"an Alibaba 2023 pod list has {', '.join(TRACE_COLUMNS)} (and more)."
            )
        rows = [row for row in (_pod(r, f"{path}:{reader.line_num}") for r in reader) if row is not None]
    rows.sort(key=lambda r: (r["creation_time"], r["name"]))
    rows = [r for r in rows if r["creation_time"] >= start_s][:jobs]
    if not rows:
        return []
    t0 = rows[0]["creation_time"]
    out = []
    for r in rows:
        duration = max(1.0, r["deletion_time"] - r["scheduled_time"])
        if max_duration_s is not None:
            duration = min(duration, max_duration_s)
        parts = need_of(num_gpu=r["num_gpu"], gpu_milli=r["gpu_milli"], mapping=mapping, gpu_model=gpu_model)
        out.append(
            Job(
                name=r["name"],
                arrival_s=r["creation_time"] - t0,
                duration_s=duration,
                parts=tuple(parts),
                priority=PRIORITY_BY_QOS.get(r["qos"], 0),
                qos=r["qos"] or "unknown",
            )
        )
    return out


def _pod(row: dict, where: str) -> dict | None:
    """The trace row's values, typed; None for a pod the simulator skips (no GPU, never scheduled).

    Raises:
        ConfigError: a value is not what its column holds (names the file, line, column and value).
    """

    def bad(column: str, allowed: str) -> ConfigError:
        return ConfigError(f"trace: {where}: {column}={row[column]!r}: must be {allowed}.", field=column, value=row[column])

    # csv.DictReader pads a short row with None and puts a long row's extra fields under None:
    # a row cut off (a file copied while written) would otherwise read as a pod never scheduled.
    if None in row or None in row.values():
        columns = [k for k in row if k is not None]
        fields = sum(row[k] is not None for k in columns) + len(row.get(None) or ())
        raise ConfigError(
            f"trace: {where}: the row has {fields} fields; the header has {len(columns)}: every row must have one per column.",
            field="row", value=fields,
        )

    def number(column: str) -> float:
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise bad(column, "a number (seconds)")
        return value

    try:
        num_gpu = int(row["num_gpu"] or 0)
    except ValueError:
        raise bad("num_gpu", "a whole number, 0 or more") from None
    if num_gpu < 0:
        raise bad("num_gpu", "a whole number, 0 or more")
    if num_gpu == 0 or not row["scheduled_time"] or not row["deletion_time"]:
        return None
    try:
        gpu_milli = int(row["gpu_milli"] or 1000)
    except ValueError:
        gpu_milli = 0
    if not 0 < gpu_milli <= 1000:
        raise bad("gpu_milli", "a whole number from 1 to 1000 (thousandths of a GPU; empty = 1000)")
    pod = {
        "name": row["name"], "qos": row["qos"], "num_gpu": num_gpu, "gpu_milli": gpu_milli,
        **{c: number(c) for c in ("creation_time", "scheduled_time", "deletion_time")},
    }
    if pod["deletion_time"] < pod["scheduled_time"]:
        raise bad("deletion_time", f"at or after scheduled_time ({row['scheduled_time']})")
    return pod


def synthetic(
    *,
    jobs: int = 500,
    gpu_model: str = "H100-80GB",
    mean_interarrival_s: float = 30.0,
    mean_duration_s: float = 600.0,
    phases: int = 3,
    seed: int = 0,
) -> list[Job]:
    """A made-up workload whose mix of slice sizes shifts between `phases` (first mostly small
    inference steps, then mostly mid-size, then big ones): the case a fixed layout cannot follow."""
    rng = random.Random(seed)
    model = get_model(gpu_model)
    sizes = sorted({(_gb(p.name), p.compute_slices) for p in model.profiles if not p.name.endswith("+me")})
    out, t = [], 0.0
    for i in range(jobs):
        phase = min(phases - 1, i * phases // jobs)
        # weights tilt from the small end to the big end across phases
        weights = [math.exp(-abs(k - phase * (len(sizes) - 1) / max(1, phases - 1))) for k in range(len(sizes))]
        need = rng.choices(sizes, weights)[0]
        t += rng.expovariate(1 / mean_interarrival_s)
        out.append(
            Job(
                name=f"synthetic-{i:05d}",
                arrival_s=round(t, 3),
                duration_s=round(rng.expovariate(1 / mean_duration_s) + 1, 3),
                parts=(need,),
                priority=rng.choice((0, 0, 5, 10)),
                qos="synthetic",
            )
        )
    return out
