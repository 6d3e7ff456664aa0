"""``cai-hpc pca``: the distributed PCA equals numpy's SVD of the whole matrix, alone, under
``mpiexec -n 3`` and over lambda_shim's TcpComm (``python -m lambda_shim.launch -n 3``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc import predictions
from cai_hpc.pca import fix_signs
from tests.conftest import MPIEXEC, cai_hpc, requires_infra
from tests.test_catalog import moto_s3  # noqa: F401 - the fixture (its own moto server for this module)

ROWS = (37, 50, 11, 64, 29)  # uneven shards: three ranks get unequal shares
WIDTH = 24
K = 4


def embeddings_run(out: Path, seed: int = 0) -> np.ndarray:
    """Prediction files holding embeddings with a planted, well-separated spectrum (written
    as the engine writes them); returns the whole matrix."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(WIDTH, WIDTH)))
    scales = 2.0 ** -np.arange(WIDTH)
    (out / "predictions").mkdir(parents=True)
    parts = []
    for s, rows in enumerate(ROWS):
        x = (rng.normal(size=(rows, WIDTH)) * scales) @ basis.T + 5.0
        parts.append(x.astype(np.float32))
        with h5py.File(out / "predictions" / f"shard-{s:05d}.h5", "w") as f:
            f.attrs.update({"format": predictions.FORMAT, "format_version": 1, "source": f"shard-{s:05d}.h5"})
            f["redshift_pred"] = np.zeros(rows, np.float32)
            f["embeddings"] = parts[-1]
            f["object_id"] = np.arange(rows) + 1000 * s
    return np.concatenate(parts).astype(np.float64)


def assert_equals_numpy(run: Path, x: np.ndarray) -> None:
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    components = fix_signs(vt[:K])
    with h5py.File(run / "pca" / "components.h5") as f:
        np.testing.assert_allclose(f["mean"][:], x.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(f["components"][:], components, atol=1e-5)
        np.testing.assert_allclose(f["explained_variance"][:], s[:K] ** 2 / (len(x) - 1), rtol=1e-5)
        np.testing.assert_allclose(f["explained_variance_ratio"][:], s[:K] ** 2 / (s**2).sum(), rtol=1e-5)
        assert f.attrs["samples"] == len(x)
    projection, ids = [], []
    for s_, _ in enumerate(ROWS):
        with h5py.File(run / "pca" / "projections" / f"shard-{s_:05d}.h5") as f:
            projection.append(f["projection"][:])
            ids.append(f["object_id"][:])
    np.testing.assert_allclose(np.concatenate(projection), centred @ components.T, atol=1e-5)
    np.testing.assert_array_equal(
        np.concatenate(ids), np.concatenate([np.arange(r) + 1000 * s for s, r in enumerate(ROWS)])
    )


def test_pca_alone_equals_numpys_svd(tmp_path) -> None:
    x = embeddings_run(tmp_path / "run")
    result = cai_hpc("pca", str(tmp_path / "run"), "--components", str(K), "--backend", "self")
    assert result.returncode == 0, result.stderr
    assert_equals_numpy(tmp_path / "run", x)


@requires_infra(None if MPIEXEC else "no mpiexec")
@pytest.mark.timeout(300)
def test_pca_under_mpiexec_equals_numpys_svd(tmp_path) -> None:
    x = embeddings_run(tmp_path / "run", seed=1)
    command = [MPIEXEC, "-n", "3", sys.executable, "-m", "cai_hpc", "pca", str(tmp_path / "run"), "-k", str(K)]
    result = subprocess.run([*command, "--backend", "mpi", "-q"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert_equals_numpy(tmp_path / "run", x)


@pytest.mark.timeout(300)
def test_pca_on_tcpcomm_equals_numpys_svd(tmp_path) -> None:
    x = embeddings_run(tmp_path / "run", seed=2)
    launch = [sys.executable, "-m", "lambda_shim.launch", "-n", "3", "--"]
    command = [*launch, sys.executable, "-m", "cai_hpc", "pca", str(tmp_path / "run"), "-k", str(K), "--backend", "tcp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert_equals_numpy(tmp_path / "run", x)


def test_the_sign_rule_makes_the_largest_entry_positive() -> None:
    flipped = fix_signs(np.array([[0.1, -0.9, 0.3], [0.5, 0.2, -0.1], [-0.6, 0.6, 0.0]]))
    np.testing.assert_array_equal(flipped, [[-0.1, 0.9, -0.3], [0.5, 0.2, -0.1], [0.6, -0.6, 0.0]])


def test_a_run_without_embeddings_is_one_line_naming_the_fix(tmp_path) -> None:
    embeddings_run(tmp_path / "run")
    with h5py.File(tmp_path / "run" / "predictions" / "shard-00002.h5", "a") as f:
        del f["embeddings"]
    result = cai_hpc("pca", str(tmp_path / "run"), "-k", "2", "--backend", "self")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "shard-00002.h5: no embeddings" in lines[0] and "cai-hpc infer --embeddings" in lines[0]
    assert not (tmp_path / "run" / "pca").exists()
    embeddings_run(tmp_path / "other")
    too_many = cai_hpc("pca", str(tmp_path / "other"), "-k", "25", "--backend", "self")
    assert too_many.returncode == 2 and "at most min(samples, features) = 24" in too_many.stderr


@pytest.mark.timeout(600)
def test_memory_per_rank_does_not_grow_with_the_sample_count(tmp_path) -> None:
    """200,000 samples of 128 features (100 files) take no more memory than 2,000 (one file),
    within 100 MB; the whole matrix, held in float64, would be 205 MB."""
    peaks = {}
    for files in (1, 100):
        run = tmp_path / f"run-{files}"
        (run / "predictions").mkdir(parents=True)
        rng = np.random.default_rng(files)
        for s in range(files):
            with h5py.File(run / "predictions" / f"shard-{s:05d}.h5", "w") as f:
                f.attrs.update({"format": predictions.FORMAT, "format_version": 1, "source": f"shard-{s:05d}.h5"})
                f["redshift_pred"] = np.zeros(2000, np.float32)
                f["embeddings"] = rng.normal(size=(2000, 128)).astype(np.float32)
        measure = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        command = [sys.executable, "-m", "cai_hpc", "pca", str(run), "-k", "3", "--backend", "self", "-q"]
        result = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks[files] = int(result.stdout) / 1024
    assert peaks[100] - peaks[1] < 100, peaks


def test_pca_reads_and_writes_s3(moto_s3, tmp_path) -> None:  # noqa: F811 - the imported fixture
    x = embeddings_run(tmp_path / "run", seed=3)
    for path in sorted((tmp_path / "run" / "predictions").iterdir()):
        moto_s3.upload_file(str(path), "cat", f"pca-run/predictions/{path.name}")
    result = cai_hpc("pca", "s3://cat/pca-run", "-k", str(K), "--backend", "self", "-q")
    assert result.returncode == 0, result.stderr
    local = tmp_path / "fetched" / "pca"
    (local / "projections").mkdir(parents=True)
    keys = [o["Key"] for o in moto_s3.list_objects_v2(Bucket="cat", Prefix="pca-run/pca/")["Contents"]]
    assert len(keys) == 1 + len(ROWS)
    for key in keys:
        moto_s3.download_file("cat", key, str(local / key[len("pca-run/pca/") :]))
    assert_equals_numpy(tmp_path / "fetched", x)
