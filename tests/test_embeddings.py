"""``infer --embeddings``: the joint feature vectors beside the predictions, written with them."""

from __future__ import annotations

import h5py
import numpy as np

from cai_hpc.comm import SelfComm
from cai_hpc.embeddings import EMBEDDING_DIM
from cai_hpc.engine import RunConfig, run
from cai_hpc.synth import synthesize
from tests.conftest import cai_hpc


def test_embeddings_are_added_to_a_finished_run_without_changing_its_predictions(tmp_path) -> None:
    synthesize(tmp_path / "data", 40, 0.5, seed=3)  # shards of 24 and 16 rows
    options = {"data": tmp_path / "data", "out": tmp_path / "out", "batch_size": 16, "threads": 1, "progress": False}
    run(SelfComm(), RunConfig(**options))
    plain = {}
    for path in sorted((tmp_path / "out" / "predictions").glob("*.h5")):
        with h5py.File(path) as f:
            assert "embeddings" not in f
            plain[path.name] = f["redshift_pred"][:]
    # Finished shards without embeddings are not finished for a run that asks for them.
    summary = run(SelfComm(), RunConfig(**options, embeddings=True))
    assert summary["skipped_shards"] == 0 and summary["samples"] == 40
    for name, pred in plain.items():
        with h5py.File(tmp_path / "out" / "predictions" / name) as f:
            np.testing.assert_array_equal(f["redshift_pred"][:], pred)  # the head ran on these features
            assert f["embeddings"].shape == (len(pred), EMBEDDING_DIM) and f["embeddings"].dtype == np.float32
            assert np.isfinite(f["embeddings"][:]).all() and f["embeddings"][:].std() > 0
    again = run(SelfComm(), RunConfig(**options, embeddings=True))
    assert again["skipped_shards"] == 2 and again["samples"] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir()) == sorted(plain)  # no temporaries


def test_embeddings_with_compile_is_one_line(tmp_path) -> None:
    synthesize(tmp_path / "data", 8, 1.0, seed=1)
    result = cai_hpc(
        "infer", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--embeddings", "--compile"
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--embeddings" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
