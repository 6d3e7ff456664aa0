"""The engine under real MPI ranks (the pip MPICH wheel): same answers at any size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import MPIEXEC, requires_infra

SUITE = Path(__file__).with_name("test_parallel_engine.py")
pytestmark = requires_infra(None if MPIEXEC else "no mpiexec (pip install 'cai-hpc[mpi]')")


def mpiexec(ranks: int, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_"))}
    return subprocess.run(
        [MPIEXEC, "-n", str(ranks), sys.executable, *command], capture_output=True, text=True, timeout=300, env=env
    )


def launch(ranks: int, *args: str) -> subprocess.CompletedProcess:
    return mpiexec(ranks, "-m", "cai_hpc", "infer", "--backend", "mpi", "-q", *args)


def launch_failing(ranks: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``launch``, and the seconds from the job's first error line to the end of the job: how
    long a failure takes to end every rank, whatever the start-up before it cost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_"))}
    command = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "cai_hpc", "infer", "--backend", "mpi", "-q", *args]
    lines: list[tuple[float, str]] = []
    stdout: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        readers = [
            threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stderr)),
            threading.Thread(target=lambda: stdout.extend(proc.stdout)),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=300)
        finally:
            proc.kill()
            ended = time.monotonic()
            for reader in readers:
                reader.join(timeout=10)
    stderr = "".join(line for _, line in lines)
    reported = next((at for at, line in lines if line.startswith("cai-hpc: error")), None)
    assert reported is not None, stderr
    return subprocess.CompletedProcess(command, proc.returncode, "".join(stdout), stderr), ended - reported


@pytest.mark.parametrize("ranks", [2, 4])
def test_pytest_mpi_suite(ranks) -> None:
    result = mpiexec(ranks, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", str(SUITE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout


def test_mpi_is_initialised_funneled() -> None:
    # Only the main thread calls MPI; mpi4py would ask for MULTIPLE (which MPICH grants).
    probe = (  # one write per rank: print() writes its newline apart, and two ranks' lines can interleave
        "import sys; from cai_hpc.comm import get_comm; get_comm('mpi'); from mpi4py import MPI; "
        "sys.stdout.write(f'{MPI.Query_thread()}\\n')"
    )
    result = mpiexec(2, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]  # MPI_THREAD_FUNNELED (MPICH's value, and the standard's order)


def predictions(out: Path) -> dict[str, np.ndarray]:
    return {p.name: h5py.File(p)["redshift_pred"][:] for p in sorted((out / "predictions").glob("*.h5"))}


@pytest.fixture(scope="module")
def one_rank(small_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mpi1") / "out"
    result = launch(1, "--data", str(small_dataset), "--out", str(out), "--batch-size", "40")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("ranks", [3, 4])
def test_metrics_and_predictions_match_one_rank(ranks, one_rank, small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    result = launch(ranks, "--data", str(small_dataset), "--out", str(out), "--batch-size", "40")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((one_rank / "summary.json").read_text())
    assert summary["backend"] == "mpi" and summary["world_size"] == ranks
    assert [r["rank"] for r in summary["ranks"]] == list(range(ranks))
    assert sum(r["samples"] for r in summary["ranks"]) == 300
    for key, value in reference["metrics"].items():
        assert summary["metrics"][key] == pytest.approx(value, rel=1e-6), key
    ref = predictions(one_rank)
    got = predictions(out)
    assert sorted(got) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=0)


def test_more_ranks_than_samples(small_dataset, tmp_path) -> None:
    result = launch(3, "--data", str(small_dataset), "--out", str(tmp_path / "out"), "--limit", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["samples"] for r in summary["ranks"]] == [1, 1, 0]
    assert summary["metrics"]["labelled"] == 2


def test_bad_input_on_any_rank_is_reported_once_and_writes_nothing(small_dataset, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    # 300 rows on 4 ranks: rank 1 reads rows 75-150, so shard 2 (rows 96-144) is its alone.
    with h5py.File(data / "shard-00002.h5", "a") as f:
        f["images"][3, 0, 0, 0] = np.nan
    result, ending_s = launch_failing(4, "--data", str(data), "--out", str(tmp_path / "out"), "--validate", "full")
    assert ending_s < 40  # every rank exits on its own: 2.6-3.7 s measured on 2 loaded cores
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai-hpc: error")]
    assert errors == [f"cai-hpc: error: {data / 'shard-00002.h5'}: dataset 'images' holds NaN or inf (first at row 3)"]
    assert not (tmp_path / "out").exists()


def test_a_failure_on_one_rank_aborts_the_whole_job(small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    # The last shard's output name is taken by a directory: only its writer (rank 3) fails,
    # late in the run, while the other ranks wait for it in a collective.
    (out / "predictions" / "shard-00006.h5").mkdir(parents=True)
    result, ending_s = launch_failing(4, "--data", str(small_dataset), "--out", str(out))
    assert ending_s < 10  # the job is aborted, not left to hang: 0.5-0.6 s measured on 2 loaded cores
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai-hpc: error")]
    assert len(errors) == 1 and errors[0].startswith("cai-hpc: error: rank 3: IsADirectoryError"), result.stderr
    assert not (out / "summary.json").exists()
