"""``slurm/infer.sbatch`` submitted to a real Slurm (the one-node cluster .ci/run starts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from tests.conftest import requires_infra

REPO = Path(__file__).resolve().parents[1]


def _slurm_is_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on this machine (apt-get install slurmd slurmctld slurm-client munge)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no Slurm controller answers (start one: slurm/local-cluster.sh start): {probe.stderr.strip()}"
    return None


pytestmark = requires_infra(_slurm_is_up())


def sbatch(tmp_path: Path, data: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_JOB"))}
    environ |= {"DATA": str(data), "OUT": str(out), "VENV": sys.prefix, "BATCH_SIZE": "40", **env}
    return subprocess.run(
        [
            "sbatch",
            "--wait",
            "--ntasks=2",
            "--cpus-per-task=1",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/job.out",
            str(REPO / "slurm" / "infer.sbatch"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
    )


def test_infer_sbatch_runs_two_ranks_and_matches_one_process(small_dataset, tmp_path) -> None:
    result = sbatch(tmp_path, small_dataset, tmp_path / "out")
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert result.returncode == 0, result.stderr + log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == 2
    assert summary["threads_per_rank"] == 1
    single = run(SelfComm(), RunConfig(small_dataset, tmp_path / "one", batch_size=40, threads=1, progress=False))
    for key, value in single["metrics"].items():
        assert summary["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_ranks_that_cannot_see_each_other_are_refused(small_dataset, tmp_path) -> None:
    # srun --mpi=none gives MPICH no PMI: every task would be a lone rank 0 doing the whole job.
    result = sbatch(tmp_path, small_dataset, tmp_path / "out", SRUN_MPI="none")
    assert result.returncode != 0
    log = (tmp_path / "job.out").read_text()
    assert "the launcher started 2 tasks but MPI sees a world of 1" in log
    assert not (tmp_path / "out").exists()
