"""The engine under real MPI ranks (the pip MPICH wheel): same answers at any size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
SUITE = Path(__file__).with_name("test_parallel_engine.py")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'cai-hpc[mpi]')")


def mpiexec(ranks: int, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "SLURM_"))}
    return subprocess.run(
        [MPIEXEC, "-n", str(ranks), sys.executable, *command], capture_output=True, text=True, timeout=300, env=env
    )


def launch(ranks: int, *args: str) -> subprocess.CompletedProcess:
    return mpiexec(ranks, "-m", "cai_hpc", "infer", "--backend", "mpi", "-q", *args)


@pytest.mark.parametrize("ranks", [2, 4])
def test_pytest_mpi_suite(ranks) -> None:
    result = mpiexec(ranks, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", str(SUITE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout


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
    t0 = time.monotonic()
    result = launch(4, "--data", str(data), "--out", str(tmp_path / "out"), "--validate", "full")
    assert time.monotonic() - t0 < 60
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai-hpc: error")]
    assert errors == [f"cai-hpc: error: {data / 'shard-00002.h5'}: dataset 'images' holds NaN or inf (first at row 3)"]
    assert not (tmp_path / "out").exists()


def test_a_failure_on_one_rank_aborts_the_whole_job(small_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    # The last shard's output name is taken by a directory: only its writer (rank 3) fails,
    # late in the run, while the other ranks wait for it in a collective.
    (out / "predictions" / "shard-00006.h5").mkdir(parents=True)
    t0 = time.monotonic()
    result = launch(4, "--data", str(small_dataset), "--out", str(out))
    assert time.monotonic() - t0 < 60  # seconds, not a hang until some timeout
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cai-hpc: error")]
    assert len(errors) == 1 and errors[0].startswith("cai-hpc: error: rank 3: IsADirectoryError"), result.stderr
    assert not (out / "summary.json").exists()
