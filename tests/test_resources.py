"""Threads and device per rank, from flags and the launcher's environment (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cai_hpc.errors import InputError
from cai_hpc.resources import cpu_has_bf16, local_rank, local_ranks, pick_device, threads_per_rank


def test_threads_flag_wins_then_slurm_then_cores_over_local_ranks() -> None:
    assert threads_per_rank(3, {"SLURM_CPUS_PER_TASK": "8"}, cores=2) == 3
    assert threads_per_rank(None, {"SLURM_CPUS_PER_TASK": "8"}, cores=2) == 8
    assert threads_per_rank(None, {"MPI_LOCALNRANKS": "4"}, cores=16) == 4
    assert threads_per_rank(None, {"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, cores=2) == 1
    assert threads_per_rank(None, {}, cores=6) == 6
    with pytest.raises(InputError, match="--threads must be at least 1"):
        threads_per_rank(0, {})


def test_local_rank_and_size_from_each_launcher() -> None:
    assert local_ranks({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 4
    assert local_ranks({}) == 1
    assert local_rank({"MPI_LOCALRANKID": "2"}) == 2
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "5"}) == 5
    assert local_rank({"SLURM_LOCALID": "1"}) == 1
    assert local_rank({"MV2_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert local_rank({"PALS_LOCAL_RANKID": "3", "PALS_RANKID": "7"}) == 3  # PBS/PALS (Aurora, Polaris)
    assert local_rank({"PMI_LOCAL_RANK": "2", "PMI_RANK": "6"}) == 2  # Cray MPICH
    assert local_ranks({"PMI_LOCAL_SIZE": "4"}) == 4 and local_ranks({"MV2_COMM_WORLD_LOCAL_SIZE": "2"}) == 2


def test_an_mpi_launcher_inside_an_allocation_outranks_sruns_task() -> None:
    # Hydra's rank 1 of 2 on one node, below the one srun task of its proxy.
    hydra = {"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert (local_rank(hydra), local_ranks(hydra)) == (1, 2)
    pals = {"PALS_LOCAL_RANKID": "1", "SLURM_LOCALID": "0"}
    assert pick_device("cuda", pals, gpus=4) == "cuda:1"


@pytest.mark.parametrize("rank, gpus, device", [("0", 4, "cuda:0"), ("5", 4, "cuda:1"), ("3", 1, "cuda:0")])
def test_each_rank_takes_local_rank_mod_gpus(rank, gpus, device) -> None:
    assert pick_device("cuda", {"SLURM_LOCALID": rank}, gpus=gpus) == device


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="--device cuda: no CUDA device is visible"):
        pick_device("cuda", {}, gpus=0)
    assert pick_device("cpu", {}) == "cpu"


def test_bf16_instructions_are_read_from_the_cpu_flags() -> None:
    assert cpu_has_bf16("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n") is True
    assert cpu_has_bf16("flags\t\t: fpu avx2 fma\nflags\t\t: fpu avx2 fma\n") is False  # AVX2 only
    assert cpu_has_bf16("Features\t: fp asimd sve bf16\n") is True  # Arm
    assert cpu_has_bf16("processor\t: 0\n") is None  # no flags line: cannot tell


def test_peak_rss_is_this_process_not_the_parent_that_started_it() -> None:
    # Linux's ru_maxrss survives fork and exec: a rank started by a large parent would report
    # the parent's peak as its own.
    ballast = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB, touched
    probe = "from cai_hpc.records import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert float(child.stdout) < ballast.nbytes / 2**20 / 2, child.stdout
