"""Launcher detection: the MPI's own world first, Slurm's step only when no MPI variable is set.

The environments are the variables each launcher was seen to set on the local Slurm 22.05
cluster (Hydra from the pip MPICH wheel, srun --mpi=pmi2|none|cray_shasta) and the ones
Open MPI documents for mpirun.
"""

from __future__ import annotations

import pytest

from cai_hpc.comm import Launch, check_world_size, detect_launch, launched_by_mpi, launcher_world_size
from cai_hpc.errors import InputError
from cai_hpc.records import slurm_job

JOB = {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "vm", "SLURM_CPUS_ON_NODE": "2"}
# `mpiexec -n 2` in a batch script: Hydra starts one proxy per node through srun, the proxy
# starts both ranks, so each rank inherits the proxy's one-task step.
HYDRA_IN_ALLOCATION = JOB | {
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "PMI_SIZE": "2",
    "PMI_RANK": "1",
    "PMI_FD": "6",
    "MPI_LOCALNRANKS": "2",
    "MPI_LOCALRANKID": "1",
}
SRUN_STEP = JOB | {
    "SLURM_STEP_ID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
}
SRUN_PMI2 = SRUN_STEP | {"PMI_SIZE": "2", "PMI_RANK": "1", "PMI_FD": "13", "PMI_JOBID": "7.1"}
SRUN_PMIX = SRUN_STEP | {"PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.7.1"}
SRUN_CRAY = SRUN_STEP | {"PALS_RANKID": "1", "PALS_APID": "7.1", "PALS_NODEID": "0"}
OPEN_MPI_MPIRUN = {
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "PMIX_RANK": "2",
    "PMIX_NAMESPACE": "prterun-vm-123@1",
}
HYDRA = {"PMI_SIZE": "3", "PMI_RANK": "0", "PMI_FD": "5", "MPI_LOCALNRANKS": "3", "MPI_LOCALRANKID": "0"}


def library() -> str:
    return "MPICH Version: 5.0.2"


def refusal(size: int, rank: int, env: dict[str, str]) -> str:
    with pytest.raises(InputError) as caught:
        check_world_size(size, env, rank=rank, library=library)
    return str(caught.value)


def test_hydra_inside_an_allocation_is_mpiexec_with_its_own_world() -> None:
    assert detect_launch(HYDRA_IN_ALLOCATION) == Launch("mpiexec", 2, 1, "PMI")
    check_world_size(2, HYDRA_IN_ALLOCATION, rank=1)
    # Hydra without its per-node counts still announces more ranks than srun's step holds.
    without_counts = {k: v for k, v in HYDRA_IN_ALLOCATION.items() if not k.startswith("MPI_LOCAL")}
    assert detect_launch(without_counts) == Launch("mpiexec", 2, 1, "PMI")
    message = refusal(1, 0, HYDRA_IN_ALLOCATION)
    assert message.startswith("the launcher started 2 tasks but MPI sees a world of 1: this mpiexec/mpirun")
    assert "MPICH Version: 5.0.2" in message and "--mpi=" not in message


def test_srun_with_pmi_wires_the_world_and_a_mismatch_names_other_plugins() -> None:
    assert detect_launch(SRUN_PMI2) == Launch("srun", 2, 1, "PMI")
    check_world_size(2, SRUN_PMI2, rank=1)
    message = refusal(1, 0, SRUN_PMI2)
    assert message.startswith(
        "the launcher started 2 tasks but MPI sees a world of 1: srun wired the tasks through PMI,"
    )
    assert "--mpi=pmix" in message and "srun --mpi=list" in message


def test_srun_without_pmi_is_refused_with_the_plugin_to_ask_for() -> None:
    assert detect_launch(SRUN_STEP) == Launch("srun", 2, 1, None)
    check_world_size(2, SRUN_STEP, rank=1)
    message = refusal(1, 0, SRUN_STEP)
    assert message.startswith("the launcher started 2 tasks but MPI sees a world of 1: srun gave the tasks no MPI")
    assert "--mpi=pmi2" in message and "srun --mpi=list" in message and "SRUN_MPI" in message


@pytest.mark.parametrize("env, interface", [(SRUN_PMIX, "PMIx"), (SRUN_CRAY, "PALS")])
def test_srun_plugins_without_a_size_are_checked_on_the_rank(env, interface) -> None:
    assert detect_launch(env) == Launch("srun", None, 1, interface)
    check_world_size(2, env, rank=1)
    what, fix = refusal(1, 0, env).split(": ", 1)
    assert what == "the launcher started this process as rank 1 but MPI sees rank 0 of 1"
    assert fix.startswith(f"srun wired the tasks through {interface}, which mpi4py's MPI (MPICH Version: 5.0.2)")


def test_mpirun_and_mpiexec_outside_slurm() -> None:
    assert detect_launch(OPEN_MPI_MPIRUN) == Launch("mpiexec", 4, 2, "PMIx")
    check_world_size(4, OPEN_MPI_MPIRUN, rank=2)
    assert "this mpiexec/mpirun belongs to another MPI" in refusal(1, 0, OPEN_MPI_MPIRUN)
    assert detect_launch(HYDRA) == Launch("mpiexec", 3, 0, "PMI")
    assert refusal(1, 0, HYDRA).startswith("the launcher started 3 tasks but MPI sees a world of 1: this mpiexec")


def test_no_launcher_no_check() -> None:
    # A batch script sees its job's task count but is one process; module-set PMIx settings
    # are no launch either.
    for env in ({}, JOB | {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, {"PMIX_MCA_gds": "hash"}):
        assert detect_launch(env) is None and not launched_by_mpi(env) and launcher_world_size(env) is None
        check_world_size(1, env, rank=0)
    assert launched_by_mpi(SRUN_STEP) and launcher_world_size(HYDRA_IN_ALLOCATION) == 2


def test_the_summary_names_the_slurm_job_only_inside_one() -> None:
    assert slurm_job({}) is None and slurm_job(HYDRA) is None
    assert slurm_job(SRUN_PMI2 | {"SLURM_JOB_NODELIST": "node[01-04]", "SLURM_RESTART_COUNT": "2"}) == {
        "job_id": "7",
        "step_id": "1",
        "nodelist": "node[01-04]",
        "restart_count": "2",
    }
