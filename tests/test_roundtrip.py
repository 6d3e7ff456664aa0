"""Round trips through the real pipeline: FITS and npy inputs -> ``convert`` -> shards ->
``infer`` (one rank, and three under mpiexec with ``--embeddings``) -> ``catalog`` in FITS,
Parquet and CSV, values and metadata checked against the inputs and the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits

from cai_hpc.checkpoint import inference_weights
from cai_hpc.embeddings import EMBEDDING_DIM, JointOutput
from cai_hpc.fast import FusedAstroMAE
from tests.conftest import MPIEXEC, cai_hpc, requires_infra
from tests.test_catalog import read_catalog
from tests.test_convert_arrays import TABLE_OPTIONS, write_table

ROWS = 36  # 0.3 MB shards of 14 rows: three shards, which three ranks split by rows
SIDE = 40  # cut-outs larger than the model's 32x32: convert crops their centres


def survey_inputs(where: Path, kind: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Images as a FITS cube with a FITS table, or a .npy with a CSV table; the convert arguments."""
    rng = np.random.default_rng(11)
    arrays = {
        "images": rng.normal(size=(ROWS, 5, SIDE, SIDE)).astype(np.float32),
        "magnitudes": rng.uniform(15, 21, (ROWS, 5)),
        "redshift": rng.uniform(0.01, 0.5, ROWS).astype(np.float32),
        "object_id": 1237660000000000000 + rng.permutation(ROWS).astype(np.int64),
    }
    where.mkdir()
    if kind == "fits":
        fits.PrimaryHDU(arrays["images"]).writeto(where / "cube.fits")
        write_table(where / "table.fits", arrays)
        source = [str(where / "cube.fits"), "--table", str(where / "table.fits")]
    else:
        np.save(where / "images.npy", arrays["images"])
        write_table(where / "table.csv", arrays)
        source = [str(where / "images.npy"), "--table", str(where / "table.csv")]
    return arrays, [*source, *TABLE_OPTIONS, "--id-column", "objID"]


@requires_infra(None if MPIEXEC else "no mpiexec")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["fits", "npy"])
def test_inputs_to_catalogues_at_one_and_three_ranks(tmp_path, kind) -> None:
    arrays, source = survey_inputs(tmp_path / "in", kind)
    data = tmp_path / "shards"
    converted = cai_hpc("convert", *source, "--out", str(data), "--shard-mb", "0.3", "-q")
    assert converted.returncode == 0, converted.stderr
    options = ["--data", str(data), "--threads", "1", "--batch-size", "16", "-q"]
    one = cai_hpc("infer", *options, "--out", str(tmp_path / "one"), "--backend", "self")
    assert one.returncode == 0, one.stderr
    mpi = [MPIEXEC, "-n", "3", sys.executable, "-m", "cai_hpc", "infer", "--backend", "mpi", "--embeddings"]
    three = subprocess.run(
        [*mpi, *options, "--out", str(tmp_path / "three")],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert three.returncode == 0, three.stderr

    # What the model makes of the inputs, computed here apart from the pipeline.
    state, label = inference_weights(None, 0)
    model = JointOutput(FusedAstroMAE.from_state_dict(state))
    lo = (SIDE - 32) // 2
    images = torch.from_numpy(np.ascontiguousarray(arrays["images"][:, :, lo : lo + 32, lo : lo + 32]))
    with torch.inference_mode():
        joint = model(images, torch.from_numpy(arrays["magnitudes"].astype(np.float32))).numpy()

    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    for run in ("one", "three"):
        for suffix in (".fits", ".parquet", ".csv"):
            to = tmp_path / f"{run}{suffix}"
            made = cai_hpc("catalog", str(tmp_path / run), "--to", str(to), "-q")
            assert made.returncode == 0, made.stderr
            cols, meta = read_catalog(to)
            np.testing.assert_array_equal(cols["object_id"], arrays["object_id"])
            np.testing.assert_array_equal(cols["redshift"], arrays["redshift"])
            np.testing.assert_allclose(cols["redshift_pred"], joint[:, 0], atol=2e-5)
            assert list(cols["shard"]) == [f"shard-{i // 14:05d}.h5" for i in range(ROWS)]
            assert list(cols["row"]) == [i % 14 for i in range(ROWS)]
            assert meta["checkpoint"] == label and meta["weights"] == "random-seed-0/fp32"
            assert meta["precision"] == "fp32" and meta["cai_hpc_version"] == summary["versions"]["cai_hpc"]

    # --embeddings at three ranks: every shard's joint features, split shards gathered whole.
    held = []
    for i in range(3):
        with h5py.File(tmp_path / "three" / "predictions" / f"shard-{i:05d}.h5") as f:
            assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape[1] == EMBEDDING_DIM
            held.append(f["embeddings"][:])
    np.testing.assert_allclose(np.concatenate(held), joint[:, 1:], atol=1e-4)
