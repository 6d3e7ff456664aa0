"""Per-rank records and the run's ``summary.json`` (DESIGN.md schema)."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cai_hpc
from cai_hpc.storage import Location

BITS_PER_SAMPLE = 164_160  # (5*32*32 + 5) float32 values, as the reference counts them


def seconds_since_process_start() -> float:
    """This process's age. On Linux: the boot-time clock less the process's start tick (both
    count from boot; 10 ms ticks). ``psutil``'s ``create_time`` adds a boot time that the kernel
    gives in whole seconds, so its ages run up to 1 s long (0.95 s on the development machine):
    it is only the fallback."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        age = -1.0
    if age >= 0:
        return age
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` survives fork and exec, so a
    rank started by a large parent (pytest, a launcher) would report the parent's peak; the
    kernel's own high-water mark of this address space (``VmHWM``) does not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # no /proc: KiB on Linux


def rank_record(
    rank: int, samples: int, timing: dict[str, float], startup_split: dict[str, float], kernels: str
) -> dict[str, Any]:
    """One rank's line in summary.json; ``startup_split`` breaks its cold start down into
    imports, model build, weight load, finding (or building) the kernels and the first batch;
    ``kernels`` says which the ViT blocks ran on ("native" or "torch")."""
    infer_s = timing["infer_s"]
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "samples": samples,
        **{k: round(v, 6) for k, v in timing.items()},
        "samples_per_s": samples / infer_s if infer_s > 0 else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "startup_split": {k: round(v, 6) for k, v in startup_split.items()},
        "kernels": kernels,
    }


def slurm_job(env: Mapping[str, str] = os.environ) -> dict[str, str | None] | None:
    """Where a run sat in Slurm (None outside a job): job, step (None in the batch script
    itself), the job's nodes, and how many times it was requeued (a resumed run counts up)."""
    if "SLURM_JOB_ID" not in env:
        return None
    return {
        "job_id": env["SLURM_JOB_ID"],
        "step_id": env.get("SLURM_STEP_ID"),
        "nodelist": env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")),
        "restart_count": env.get("SLURM_RESTART_COUNT", "0"),
    }


def versions(backend: str) -> dict[str, str | None]:
    import torch

    mpi = None
    if backend == "mpi":
        from mpi4py import MPI

        mpi = MPI.Get_library_version().splitlines()[0].strip()
    return {
        "cai_hpc": cai_hpc.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mpi": mpi,
    }


def build_summary(
    *,
    backend: str,
    ranks: list[dict[str, Any]],
    wall_s: float,
    metrics: dict[str, float] | None,
    settings: dict[str, Any],
    model: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    samples = sum(r["samples"] for r in ranks)
    samples_per_s = samples / wall_s if wall_s > 0 else 0.0

    def worst(key: str) -> float:
        return max(r[key] for r in ranks)

    return {
        "backend": backend,
        "world_size": len(ranks),
        "samples": samples,
        **settings,
        "metrics": metrics,
        "timing": {
            "wall_s": wall_s,
            "startup_s": worst("startup_s"),
            "load_s": worst("load_s"),
            "infer_s": worst("infer_s"),
            "write_s": worst("write_s"),
            "comm_s": worst("comm_s"),
        },
        "throughput": {
            "samples_per_s": samples_per_s,
            "bits_per_s": samples_per_s * BITS_PER_SAMPLE,
            "sum_rank_samples_per_s": sum(r["samples_per_s"] for r in ranks),
        },
        "ranks": ranks,
        "model": model,
        "versions": versions(backend),
        "slurm": slurm_job(),
        **extra,
    }


def write_json_atomic(where: Location | Path, record: dict[str, Any]) -> None:
    Location(where).write_bytes((json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
