"""``infer --embeddings``: the joint feature vectors beside the predictions, written with them."""

from __future__ import annotations

import h5py
import numpy as np

from cai_hpc.cli import main
from cai_hpc.comm import SelfComm
from cai_hpc.dryrun import BYTES_PER_ROW
from cai_hpc.embeddings import EMBEDDING_DIM
from cai_hpc.engine import RunConfig, run
from cai_hpc.shards import scan_dataset
from cai_hpc.synth import synthesize
from tests.conftest import cai_hpc
from tests.plans import write_finished


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


def test_a_dry_run_plans_shards_without_embeddings_again_and_counts_their_features(tmp_path, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(data, 900, 6.0, seed=3)  # shards of about 290 rows
    shards = scan_dataset(data)
    assert len(shards) >= 3
    # An earlier run finished shard 0 without embeddings and shard 1 with them.
    stamp = {"checkpoint": "test", "weights": "random-seed-0/fp32"}
    (out / "predictions").mkdir(parents=True)
    for shard, features in ((shards[0], None), (shards[1], np.zeros((shards[1].rows, EMBEDDING_DIM), np.float32))):
        write_finished(out, shard, shard.rows, stamp, features)
    made = sorted(p.relative_to(out) for p in out.rglob("*"))

    def plan(*extra: str) -> tuple[str, float]:
        assert main(["infer", "--data", str(data), "--out", str(out), "--dry-run", "-q", *extra]) == 0
        text = capsys.readouterr().out
        (row,) = [line.split() for line in text.splitlines() if line.split()[:1] == ["0"]]
        return text, float(row[5])  # memory MB of rank 0

    plain, plain_mb = plan()
    assert (
        f"{900 - shards[0].rows - shards[1].rows} samples in {len(shards) - 2} shard(s) to do (2 already done)" in plain
    )
    featured, featured_mb = plan("--embeddings")
    assert f"{900 - shards[1].rows} samples in {len(shards) - 1} shard(s) to do (1 already done)" in featured
    # The features of the largest shard under way, on top of what the rows cost without them.
    largest = max(s.rows for s in shards if s is not shards[1])
    expected = (shards[0].rows * BYTES_PER_ROW + largest * 4 * EMBEDDING_DIM) / 1e6
    assert abs(featured_mb - plain_mb - expected) < 1, (featured_mb, plain_mb, expected)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == made  # nothing written
