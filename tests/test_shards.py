"""The shard format, the synthetic survey, and every kind of bad input to ``infer``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.cli import main
from cai_hpc.errors import InputError
from cai_hpc.shards import SAMPLE_BYTES, ShardInfo, ShardReader, inspect_shard, rows_per_shard, scan_dataset
from cai_hpc.synth import synthesize


def test_synth_writes_the_design_format(small_dataset: Path) -> None:
    infos = scan_dataset(small_dataset)
    assert [i.rows for i in infos] == [48] * 6 + [12]
    with h5py.File(infos[0].path) as f:
        assert f.attrs["format"] == "cai-hpc-shard" and f.attrs["format_version"] == 1
        assert f["images"].dtype == np.float32 and f["images"].shape == (48, 5, 32, 32)
        assert f["magnitudes"].shape == (48, 5) and f["redshift"].shape == (48,)
        assert f["object_id"].dtype == np.int64
        assert f["images"].chunks[1:] == (5, 32, 32)
        assert 100_000 < np.prod(f["images"].chunks) * 4 <= 256 * 1024 or f["images"].chunks[0] == 48
    ids = np.concatenate([h5py.File(i.path)["object_id"][:] for i in infos])
    assert len(np.unique(ids)) == 300


def test_shard_size_follows_shard_mb() -> None:
    assert rows_per_shard(25) == 25_000_000 // SAMPLE_BYTES
    with pytest.raises(InputError):
        rows_per_shard(0)


def test_synth_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 60, 1.0, seed=3)
    synthesize(tmp_path / "b", 60, 1.0, seed=3)
    for a, b in zip(sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir()), strict=True):
        with h5py.File(a) as fa, h5py.File(b) as fb:
            np.testing.assert_array_equal(fa["images"][:], fb["images"][:])


def test_synthetic_redshifts_look_like_sdss_and_can_be_learnt(tmp_path: Path) -> None:
    synthesize(tmp_path / "d", 4000, 41.03, seed=11)  # two shards of 2000 rows
    (a, b) = scan_dataset(tmp_path / "d")

    def load(info: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
        with ShardReader(info) as r:
            cols = r.read(0, info.rows, images=False)
        mags = cols.magnitudes.astype(np.float64)
        features = np.column_stack([np.ones(len(mags)), mags, mags[:, :-1] - mags[:, 1:]])
        return features, cols.redshift.astype(np.float64)

    xa, za = load(a)
    xb, zb = load(b)
    assert np.mean((za > 0.02) & (za < 0.3)) > 0.9
    assert 0.07 < np.median(za) < 0.15
    coef, *_ = np.linalg.lstsq(xa, za, rcond=None)
    r2 = 1 - np.sum((xb @ coef - zb) ** 2) / np.sum((zb - zb.mean()) ** 2)
    assert r2 >= 0.5


def test_images_carry_the_galaxy_light(small_dataset: Path) -> None:
    info = scan_dataset(small_dataset)[0]
    with ShardReader(info) as r:
        cols = r.read(0, info.rows)
    centre = cols.images[:, 2, 12:20, 12:20].mean(axis=(1, 2))
    edge = cols.images[:, 2, :4, :4].mean(axis=(1, 2))
    assert np.all(centre > edge)
    # brighter in r -> more light in the r image
    total = cols.images[:, 2].sum(axis=(1, 2))
    assert np.corrcoef(total, -cols.magnitudes[:, 2])[0, 1] > 0.8


def test_synth_refuses_a_directory_that_already_holds_shards(small_dataset: Path) -> None:
    with pytest.raises(InputError, match="already holds shards"):
        synthesize(small_dataset, 10, 1.0, seed=0)


# ---- bad input: one line naming the file and the problem, exit 2, nothing written ----


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _corrupt_missing_dataset(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f["magnitudes"]


def _corrupt_shape(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f["images"]
        f["images"] = np.zeros((48, 5, 16, 16), np.float32)


def _corrupt_dtype(path: Path) -> None:
    with h5py.File(path, "a") as f:
        mags = f["magnitudes"][:]
        del f["magnitudes"]
        f["magnitudes"] = mags.astype(np.float64)


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _corrupt_not_hdf5(path: Path) -> None:
    path.write_text("this is not an HDF5 file\n")


def _corrupt_nan(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f["images"][30, 2, 5, 5] = np.nan


def _corrupt_inf_magnitude(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f["magnitudes"][7, 1] = np.inf


def _corrupt_empty(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "cai-hpc-shard", 1
        f["images"] = np.zeros((0, 5, 32, 32), np.float32)
        f["magnitudes"] = np.zeros((0, 5), np.float32)


def _corrupt_version(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 2


def _corrupt_row_count(path: Path) -> None:
    with h5py.File(path, "a") as f:
        z = f["redshift"][:]
        del f["redshift"]
        f["redshift"] = z[:-1]


def _corrupt_group_index(path: Path) -> None:
    """The root group's B-tree, the file's first one (h5py's default layout), loses its signature."""
    data = bytearray(path.read_bytes())
    at = data.index(b"TREE")
    data[at : at + 4] = b"XXXX"
    path.write_bytes(bytes(data))


BAD_SHARDS = {
    "missing dataset": (_corrupt_missing_dataset, "missing dataset 'magnitudes'"),
    "wrong shape": (_corrupt_shape, "dataset 'images' has shape (48, 5, 16, 16), expected (N, 5, 32, 32)"),
    "wrong dtype": (_corrupt_dtype, "dataset 'magnitudes' has dtype float64, expected float32"),
    "truncated": (_corrupt_truncate, "not a readable HDF5 file (truncated or corrupt?): Unable to synchronously open"),
    "not hdf5": (_corrupt_not_hdf5, "not a readable HDF5 file (truncated or corrupt?): Unable to synchronously open"),
    "nan": (_corrupt_nan, "dataset 'images' holds NaN or inf (first at row 30)"),
    "inf": (_corrupt_inf_magnitude, "dataset 'magnitudes' holds NaN or inf (first at row 7)"),
    "empty": (_corrupt_empty, "empty shard (0 rows)"),
    "mixed versions": (_corrupt_version, "shard format version 2, this cai-hpc reads 1"),
    "row counts differ": (_corrupt_row_count, "dataset 'redshift' has 47 rows, 'images' has 48"),
    "damaged group index": (
        _corrupt_group_index,
        "not a readable HDF5 shard (damaged?): Unable to synchronously check",
    ),
}


# Found in the rows themselves, so only while reading them (the header is sound).
FOUND_IN_ROWS = {"nan", "inf"}


def _refused(data: Path, out: Path, bad: Path, message: str, capsys, *flags: str) -> None:
    code = main(["infer", "--data", str(data), "--out", str(out), "-q", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert str(bad) in err[0] and message in err[0], err[0]


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_refused_with_one_line_and_nothing_written(case, small_dataset, tmp_path, capsys) -> None:
    corrupt, message = BAD_SHARDS[case]
    data = _copy(small_dataset, tmp_path / "data")
    bad = data / "shard-00004.h5"
    corrupt(bad)
    out = tmp_path / "out"
    flags = ["--validate", "full"] if case in FOUND_IN_ROWS else []  # headers are always checked first
    _refused(data, out, bad, message, capsys, *flags)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(FOUND_IN_ROWS))
def test_bad_rows_found_while_streaming_leave_only_whole_valid_shards_and_a_rerun_resumes(
    case, small_dataset, tmp_path, capsys
) -> None:
    corrupt, message = BAD_SHARDS[case]
    data = _copy(small_dataset, tmp_path / "data")
    bad = data / "shard-00004.h5"
    corrupt(bad)
    out = tmp_path / "out"
    _refused(data, out, bad, message, capsys, "--batch-size", "40")
    # Shards finished before the bad batch are written and valid; nothing of the bad one or after
    # (with 40-row batches shard 3 ends in the batch before the NaN's, and in the inf's batch).
    written = sorted(p.name for p in (out / "predictions").iterdir())
    assert written == [f"shard-0000{i}.h5" for i in range(4 if case == "nan" else 3)]
    assert not (out / "summary.json").exists()
    reference = tmp_path / "reference"
    assert main(["infer", "--data", str(small_dataset), "--out", str(reference), "-q", "--batch-size", "40"]) == 0
    for name in written:
        with h5py.File(out / "predictions" / name) as got, h5py.File(reference / "predictions" / name) as ref:
            np.testing.assert_allclose(got["redshift_pred"][:], ref["redshift_pred"][:], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(got["object_id"][:], ref["object_id"][:])
            np.testing.assert_array_equal(got["redshift"][:], ref["redshift"][:])
    shutil.copy(small_dataset / bad.name, bad)  # fixed: the rerun does only what is left
    assert main(["infer", "--data", str(data), "--out", str(out), "-q", "--batch-size", "40"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_shards"] == len(written) and summary["samples"] == 300 - len(written) * 48
    assert summary["metrics"] == pytest.approx(json.loads((reference / "summary.json").read_text())["metrics"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "no such dataset directory"),
        (lambda d: d.mkdir(), "no .h5 shards in this directory"),
    ],
)
def test_missing_or_empty_dataset_directory(make, message, tmp_path, capsys) -> None:
    make(tmp_path / "data")
    code = main(["infer", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "-q"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_header_check_catches_a_foreign_hdf5_file(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = np.zeros((2, 5, 32, 32), np.float32)
    with pytest.raises(InputError, match="not a cai-hpc-shard file"):
        inspect_shard(tmp_path / "x.h5")


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda f: f.create_dataset("magnitudes", data=np.zeros((2, 5), np.float32)),
            "HDF5 arrays without the cai-hpc-shard format attributes; make shards of them with: "
            "cai-hpc convert x.h5 --out DIR",
        ),
        (
            lambda f: f.attrs.update(format=np.bytes_(b"\xffshard")),
            "not a cai-hpc-shard file (attribute 'format' is '\ufffdshard')",
        ),
        (
            lambda f: f.attrs.update(format="cai-hpc-shard", format_version="1"),
            "shard format version -1, this cai-hpc reads 1",
        ),
        (
            lambda f: f.attrs.update(format="cai-hpc-shard", format_version=1) or f.create_group("magnitudes"),
            "'magnitudes' is not a dataset",
        ),
    ],
)
def test_a_foreign_or_odd_header_is_named_in_one_line(make, message, tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = np.zeros((2, 5, 32, 32), np.float32)
        make(f)
    with pytest.raises(InputError) as refused:
        inspect_shard(tmp_path / "x.h5")
    assert str(refused.value) == f"{tmp_path / 'x.h5'}: {message}"
