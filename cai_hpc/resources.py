"""Threads and devices per rank, from flags and the launcher's environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from cai_hpc.errors import InputError

# Chosen by `cai-hpc bench kernel`: on the CPUs measured (README, Performance) batches of
# 64-128 beat 512 by up to 1.5x, the activations of a batch staying in cache.
DEFAULT_BATCH_SIZE = 128

# Per-node rank counts and ranks that MPI launchers set: Hydra (MPICH, Intel MPI), Open MPI,
# MVAPICH, Cray PALS (PBS, or srun --mpi=cray_shasta) and Cray MPICH's PMI; srun's last. An MPI
# launcher inside an allocation starts its ranks below one srun task per node, so there every
# rank sees SLURM_LOCALID=0 and one task per node: the MPI's own variables come first.
_LOCAL_SIZE_VARS = (
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "PMI_LOCAL_SIZE",
    "SLURM_STEP_TASKS_PER_NODE",
)
_LOCAL_RANK_VARS = (
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PALS_LOCAL_RANKID",
    "PMI_LOCAL_RANK",
    "SLURM_LOCALID",
)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def local_ranks(env: Mapping[str, str] = os.environ) -> int:
    """Ranks on this node according to the launcher (1 when not launched by one)."""
    for var in _LOCAL_SIZE_VARS:
        match = re.match(r"\d+", env.get(var, ""))
        if match:
            return max(1, int(match.group()))
    return 1


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This rank's index on its node (0 when not launched by a launcher)."""
    for var in _LOCAL_RANK_VARS:
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def threads_per_rank(requested: int | None, env: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """``--threads``, else ``SLURM_CPUS_PER_TASK``, else this node's cores shared by its ranks."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be at least 1, got {requested}")
        return requested
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    return max(1, (cores or usable_cores()) // local_ranks(env))


def pick_device(device: str, env: Mapping[str, str] = os.environ, gpus: int | None = None) -> str:
    """``"cpu"``, or ``"cuda:<local rank % GPUs on the node>"`` for ``device="cuda"``."""
    if device == "cpu":
        return "cpu"
    if device != "cuda":
        raise InputError(f"unknown device {device!r}: choose cpu or cuda")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise InputError("--device cuda: no CUDA device is visible to this process")
    return f"cuda:{local_rank(env) % gpus}"


# /proc/cpuinfo flags of x86 bf16 instructions; "bf16" is the Arm feature name.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 instructions; None when it cannot tell (no /proc/cpuinfo).
    Without them, bfloat16 arithmetic is emulated: many times slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = {word for line in cpuinfo.splitlines() if line.startswith(("flags", "Features")) for word in line.split()}
    return bool(flags & _BF16_FLAGS) if flags else None
