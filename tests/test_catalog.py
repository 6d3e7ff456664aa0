"""``cai-hpc catalog``: prediction files to one FITS, Parquet or CSV table, streamed, local or
on S3. (The round trips through the real pipeline are in test_roundtrip.py.)"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc import predictions
from tests.conftest import cai_hpc, moto_server

STAMP = {"checkpoint": "golden.safetensors", "weights": "sha256:0123abcd/fp32"}


def fake_run(out: Path, shards: int, rows: int, labelled: bool = True, stamp: dict | None = None) -> dict:
    """A run directory of prediction files written as the engine writes them (no inference:
    the values are the generator's), and the columns a catalogue of it must hold."""
    rng = np.random.default_rng(shards * rows)
    (out / "predictions").mkdir(parents=True)
    expected = {k: [] for k in ("object_id", "redshift_pred", "redshift", "shard", "row")}
    for s in range(shards):
        name = f"shard-{s:05d}.h5"
        pred = rng.uniform(0, 0.6, rows).astype(np.float32)
        z = rng.uniform(0, 0.6, rows).astype(np.float32)
        ids = 10**15 + s * rows + np.arange(rows, dtype=np.int64)
        with h5py.File(out / "predictions" / name, "w") as f:
            f.attrs.update({"format": predictions.FORMAT, "format_version": 1, "source": name, "rows": rows})
            f.attrs.update(stamp or STAMP)
            f["redshift_pred"], f["object_id"] = pred, ids
            if labelled:
                f["redshift"] = z
        for key, value in (("object_id", ids), ("redshift_pred", pred), ("redshift", z)):
            expected[key].append(value)
        expected["shard"] += [name] * rows
        expected["row"].append(np.arange(rows))
    return {k: np.concatenate(v) if k != "shard" else np.array(v) for k, v in expected.items()}


def read_catalog(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Columns and metadata of a catalogue, read back with astropy / pyarrow / csv."""
    if path.suffix == ".fits":
        from astropy.io import fits

        with fits.open(path) as hdus:
            hdus.verify("exception")  # a standard FITS file (astropy's checks)
            data, header = hdus["CATALOG"].data, hdus["CATALOG"].header
            cols = {n: np.array(data[n]) for n in data.names}
            meta = {
                k: header[v] for k, v in (("checkpoint", "CHECKPT"), ("weights", "WEIGHTS"), ("precision", "PRECISN"))
            }
            meta |= {"cai_hpc_version": header["CAIHPCV"], "date": header["DATE"]}
            meta["ucd"] = [header[f"TUCD{i}"] for i in range(1, len(data.names) + 1)]
        return cols, meta
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = {k.decode()[len("cai_hpc.") :]: v.decode() for k, v in table.schema.metadata.items()}
        meta["row_groups"] = pq.ParquetFile(path).metadata.num_row_groups
        return {n: table[n].to_numpy() for n in table.column_names}, meta
    with path.open() as f:
        lines = f.read().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# ") and not line.startswith("# column"))
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    types = {"object_id": np.int64, "row": np.int64, "shard": str, "redshift_pred": np.float32, "redshift": np.float32}
    return {n: np.array([r[n] for r in rows]).astype(types[n]) for n in rows[0]}, meta


def assert_catalog(path: Path, expected: dict[str, np.ndarray]) -> dict[str, str]:
    cols, meta = read_catalog(path)
    assert list(cols) == [k for k in ("object_id", "redshift_pred", "redshift", "shard", "row") if k in expected]
    for name, values in expected.items():
        np.testing.assert_array_equal(cols[name], values, err_msg=name)
    return meta


@pytest.mark.parametrize("suffix", [".fits", ".parquet", ".csv"])
def test_catalog_holds_every_row_and_the_run_metadata(tmp_path, suffix) -> None:
    expected = fake_run(tmp_path / "run", shards=3, rows=50)
    result = cai_hpc("catalog", str(tmp_path / "run"), "--to", str(tmp_path / f"cat{suffix}"), "-q")
    assert result.returncode == 0, result.stderr
    meta = assert_catalog(tmp_path / f"cat{suffix}", expected)
    assert meta["checkpoint"] == "golden.safetensors" and meta["weights"] == "sha256:0123abcd/fp32"
    assert meta["precision"] == "fp32" and meta["cai_hpc_version"] and meta["date"].startswith("20")
    if suffix == ".parquet":
        assert meta["row_groups"] == 3  # one per shard: written as they were read
    if suffix == ".fits":
        assert meta["ucd"][:3] == ["meta.id;meta.main", "src.redshift.phot", "src.redshift"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", f"cat{suffix}"])  # no temporaries


def test_unlabelled_shards_have_no_redshift_column(tmp_path) -> None:
    expected = fake_run(tmp_path / "run", shards=2, rows=7, labelled=False)
    del expected["redshift"]
    assert cai_hpc("catalog", str(tmp_path / "run"), "--to", str(tmp_path / "c.fits")).returncode == 0
    assert_catalog(tmp_path / "c.fits", expected)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (
            lambda run: (run / "predictions" / "shard-00001.h5").write_bytes(b"garbage"),
            "shard-00001.h5: not a readable",
        ),
        (
            lambda run: fake_run(run / "other", 1, 5, stamp={**STAMP, "weights": "sha256:ffff/bf16"}),
            "made with weights",
        ),
        (lambda run: [p.unlink() for p in (run / "predictions").iterdir()], "no predictions/*.h5"),
    ],
)
def test_bad_runs_are_one_line_errors_and_leave_nothing(tmp_path, spoil, message) -> None:
    run = tmp_path / "run"
    fake_run(run, shards=3, rows=5)
    spoil(run)
    if (run / "other").exists():  # a shard of another run's weights among this run's
        os.replace(run / "other" / "predictions" / "shard-00000.h5", run / "predictions" / "shard-00009.h5")
    result = cai_hpc("catalog", str(run), "--to", str(tmp_path / "cat.fits"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unknown_format_is_refused(tmp_path) -> None:
    fake_run(tmp_path / "run", shards=1, rows=3)
    result = cai_hpc("catalog", str(tmp_path / "run"), "--to", str(tmp_path / "cat.xlsx"))
    assert result.returncode == 2 and "use .fits, .parquet or .csv" in result.stderr


def _peak_rss_mb(command: list[str]) -> float:
    """The peak RSS of ``command``, measured by a fresh parent that runs nothing else."""
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stdout) / 1024


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "suffix, shards",
    [(".fits", 100), (".parquet", 100), (".csv", 100), (".fits", 1500), (".parquet", 1500)],
)
def test_memory_is_flat_in_the_catalogue_size(tmp_path, suffix, shards) -> None:
    """A catalogue of 200,000 rows (100 shards), and of 3,000,000, takes no more memory than
    one of 2,000 (one shard), within 100 MB of allocator noise. (At 3,000,000 rows the table's
    own bytes are 114 MB, so holding it whole would fail this.)"""
    peaks = {}
    for count in (1, shards):
        run = tmp_path / f"run-{count}"
        fake_run(run, shards=count, rows=2000)
        command = [sys.executable, "-m", "cai_hpc", "catalog", str(run), "--to", str(tmp_path / f"c{count}{suffix}")]
        peaks[count] = _peak_rss_mb(command)
    assert peaks[shards] - peaks[1] < 100, peaks


# ------------------------------------------------------------------ S3 (moto's server)
@pytest.fixture(scope="module")
def moto_s3():
    with moto_server():
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="cat")
        yield s3


def test_a_run_on_s3_makes_the_same_catalogue(moto_s3, tmp_path) -> None:
    expected = fake_run(tmp_path / "run", shards=3, rows=40)
    for path in sorted((tmp_path / "run" / "predictions").iterdir()):
        moto_s3.upload_file(str(path), "cat", f"runs/a/predictions/{path.name}")
    result = cai_hpc("catalog", "s3://cat/runs/a", "--to", str(tmp_path / "cat.parquet"), "-q")
    assert result.returncode == 0, result.stderr
    meta = assert_catalog(tmp_path / "cat.parquet", expected)
    assert meta["run"] == "s3://cat/runs/a" and meta["row_groups"] == 3
    missing = cai_hpc("catalog", "s3://cat/runs/none", "--to", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "no predictions/*.h5" in missing.stderr
    assert not (tmp_path / "none.csv").exists()
