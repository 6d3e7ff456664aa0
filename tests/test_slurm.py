"""``slurm/infer.sbatch`` submitted to a real Slurm (the one-node cluster .ci/run starts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run

REPO = Path(__file__).resolve().parents[1]
NODE = socket.gethostname().split(".")[0]  # the local cluster's one node


def _slurm_is_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on this machine (apt-get install slurmd slurmctld slurm-client munge)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no Slurm controller answers (start one: slurm/local-cluster.sh start): {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(_slurm_is_up() is not None, reason=str(_slurm_is_up()))


def submit(tmp_path: Path, *what: str, **env: str) -> subprocess.CompletedProcess:
    """``sbatch --wait`` two one-CPU tasks running ``what`` (a script, or --wrap=...)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_JOB"))}
    environ |= {"VENV": sys.prefix, **env}
    return subprocess.run(
        [
            "sbatch",
            "--wait",
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/job.out",
            *what,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
    )


def sbatch(tmp_path: Path, data: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return submit(tmp_path, str(REPO / "slurm" / "infer.sbatch"), DATA=str(data), OUT=str(out), BATCH_SIZE="40", **env)


def job_log(tmp_path: Path) -> str:
    return (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""


def assert_matches_one_process(summary: dict, data: Path, tmp_path: Path) -> None:
    single = run(SelfComm(), RunConfig(data, tmp_path / "one", batch_size=40, threads=1, progress=False))
    for key, value in single["metrics"].items():
        assert summary["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_infer_sbatch_runs_two_ranks_and_matches_one_process(small_dataset, tmp_path) -> None:
    result = sbatch(tmp_path, small_dataset, tmp_path / "out")
    assert result.returncode == 0, result.stderr + job_log(tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == 2
    assert summary["threads_per_rank"] == 1
    assert_matches_one_process(summary, small_dataset, tmp_path)


def test_mpiexec_inside_an_allocation_runs_its_own_world(small_dataset, tmp_path) -> None:
    # Hydra starts its proxy through srun: the ranks see a one-task Slurm step and a PMI world of 2.
    mpiexec = Path(sys.executable).with_name("mpiexec")
    infer = f"infer --backend mpi -q --data {small_dataset} --out {tmp_path / 'out'} --batch-size 40 --threads 1"
    result = submit(tmp_path, f"--wrap={mpiexec} -n 2 {sys.executable} -m cai_hpc {infer}")
    assert result.returncode == 0, result.stderr + job_log(tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == 2
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    # The ranks belong to step 0, the one srun step that Hydra started.
    assert summary["slurm"] == {"job_id": job, "step_id": "0", "nodelist": NODE, "restart_count": "0"}
    assert_matches_one_process(summary, small_dataset, tmp_path)


def test_ranks_that_cannot_see_each_other_are_refused(small_dataset, tmp_path) -> None:
    # srun --mpi=none gives MPICH no PMI: every task would be a lone rank 0 doing the whole job.
    result = sbatch(tmp_path, small_dataset, tmp_path / "out", SRUN_MPI="none")
    assert result.returncode != 0
    log = job_log(tmp_path)
    assert "the launcher started 2 tasks but MPI sees a world of 1: srun gave the tasks no MPI" in log
    assert not (tmp_path / "out").exists()
