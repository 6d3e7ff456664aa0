"""``cai-hpc convert`` from the inputs surveys have: FITS cutout cubes (one file, or one per
band), numpy .npy/.npz and plain HDF5 arrays, with magnitudes, redshift and ids from a FITS or
CSV table; and the line that sends an unformatted HDF5 file to ``convert``."""

from __future__ import annotations

import contextlib
import csv
import io
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from cai_hpc.cli import main
from cai_hpc.shards import ShardReader, scan_dataset
from tests.conftest import cai_hpc

ROWS = 30


def survey(seed: int = 0, side: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.normal(size=(ROWS, 5, side, side)).astype(np.float32),
        "magnitudes": rng.uniform(14, 20, (ROWS, 5)),
        "redshift": rng.uniform(0, 0.4, ROWS).astype(np.float32),
        "object_id": 1237650000000000000 + np.arange(ROWS, dtype=np.int64) * 7,
    }


def write_table(path: Path, arrays: dict[str, np.ndarray]) -> None:
    columns = {f"psfMag_{b}": arrays["magnitudes"][:, i] for i, b in enumerate("ugriz")}
    columns |= {"z_spec": arrays["redshift"], "objID": arrays["object_id"]}
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(zip(*(v.tolist() for v in columns.values()), strict=True))
    else:
        Table(columns).write(path)


TABLE_OPTIONS = ["--mag-columns", "psfMag_u,psfMag_g,psfMag_r,psfMag_i,psfMag_z", "--redshift-column", "z_spec"]


def convert(*args: str) -> subprocess.CompletedProcess:
    """``cai-hpc convert ARGS`` in this process (no interpreter start per case): exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["convert", *args])
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def read_all(data: Path) -> dict[str, np.ndarray]:
    parts = []
    for info in scan_dataset(data):
        with ShardReader(info) as r:
            parts.append(r.read(0, info.rows))
    return {
        name: np.concatenate([getattr(c, name) for c in parts]) if getattr(parts[0], name) is not None else None
        for name in ("images", "magnitudes", "redshift", "object_id")
    }


def assert_converted(data: Path, arrays: dict[str, np.ndarray], with_ids: bool = True) -> None:
    got = read_all(data)
    lo = (arrays["images"].shape[-1] - 32) // 2
    np.testing.assert_array_equal(got["images"], arrays["images"][:, :, lo : lo + 32, lo : lo + 32])
    np.testing.assert_array_equal(got["magnitudes"], arrays["magnitudes"].astype(np.float32))
    np.testing.assert_array_equal(got["redshift"], arrays["redshift"])
    if with_ids:
        np.testing.assert_array_equal(got["object_id"], arrays["object_id"])
    else:
        assert got["object_id"] is None


@pytest.mark.parametrize("table_suffix", [".fits", ".csv"])
def test_a_fits_cube_with_a_table(tmp_path, table_suffix) -> None:
    arrays = survey()
    fits.PrimaryHDU().writeto(tmp_path / "empty-primary.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(arrays["images"])]).writeto(tmp_path / "cube.fits")
    write_table(tmp_path / f"cat{table_suffix}", arrays)
    result = convert(
        str(tmp_path / "cube.fits"), "--table", str(tmp_path / f"cat{table_suffix}"),
        *TABLE_OPTIONS, "--id-column", "objID", "--out", str(tmp_path / "shards"), "--shard-mb", "0.5", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [i.rows for i in scan_dataset(tmp_path / "shards")] == [24, 6]
    assert_converted(tmp_path / "shards", arrays)


def test_one_fits_file_per_band(tmp_path) -> None:
    arrays = survey(1, side=32)
    bands = []
    for i, band in enumerate("ugriz"):
        bands.append(tmp_path / f"{band}.fits")
        fits.PrimaryHDU(arrays["images"][:, i]).writeto(bands[-1])
    write_table(tmp_path / "cat.fits", arrays)
    result = convert(
        *map(str, bands), "--table", str(tmp_path / "cat.fits"), *TABLE_OPTIONS,
        "--out", str(tmp_path / "shards"), "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_converted(tmp_path / "shards", arrays, with_ids=False)


@pytest.mark.parametrize("kind", ["npy", "npz", "h5"])
def test_numpy_and_plain_hdf5_arrays(tmp_path, kind) -> None:
    arrays = survey(2)
    table = []
    if kind == "npy":
        np.save(tmp_path / "images.npy", arrays["images"])
        write_table(tmp_path / "cat.csv", arrays)
        table = ["--table", str(tmp_path / "cat.csv"), *TABLE_OPTIONS, "--id-column", "objID"]
    elif kind == "npz":
        np.savez(tmp_path / "images.npz", **arrays)
    else:
        with h5py.File(tmp_path / "images.h5", "w") as f:
            for name, values in arrays.items():
                f[name] = values
    result = convert(str(tmp_path / f"images.{kind}"), *table, "--out", str(tmp_path / "shards"), "-q")
    assert result.returncode == 0, result.stderr
    assert_converted(tmp_path / "shards", arrays)


def test_an_unformatted_hdf5_file_is_sent_to_convert(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    arrays = survey(3, side=32)
    with h5py.File(tmp_path / "data" / "mine.h5", "w") as f:
        for name, values in arrays.items():
            f[name] = values.astype(np.float32) if name != "object_id" else values
    result = cai_hpc("infer", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "mine.h5" in lines[0] and "cai-hpc convert mine.h5 --out DIR" in lines[0]
    assert not (tmp_path / "out").exists()
    fixed = convert(str(tmp_path / "data" / "mine.h5"), "--out", str(tmp_path / "shards"), "-q")
    assert fixed.returncode == 0, fixed.stderr
    assert_converted(tmp_path / "shards", arrays)


def _spoil_table_row(tmp_path: Path, arrays: dict) -> list[str]:
    write_table(tmp_path / "cat.csv", arrays)
    text = (tmp_path / "cat.csv").read_text().splitlines()
    cells = text[8].split(",")
    cells[2] = ""  # row 7's r magnitude left blank
    text[8] = ",".join(cells)
    (tmp_path / "cat.csv").write_text("\n".join(text) + "\n")
    return ["--table", str(tmp_path / "cat.csv"), *TABLE_OPTIONS]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, a: (np.save(p / "x.npy", a["images"][:, :4]), []), "images have shape (30, 4, 40, 40)"),
        (lambda p, a: (np.save(p / "x.npy", a["images"][:, :, :20, :20]), []), "expected (N, 5, S, S) with S >= 32"),
        (lambda p, a: (np.save(p / "x.npy", a["images"]), []), "holds no magnitudes: give them with --table"),
        (lambda p, a: (np.save(p / "x.npy", a["images"]), _spoil_table_row(p, a)), "psfMag_r is blank at row 7"),
        (
            lambda p, a: (
                np.save(p / "x.npy", a["images"]),
                ["--table", str(p / "cat.fits"), "--redshift-column", "z"],
            ),
            "no column mag_u, mag_g",
        ),
        (
            lambda p, a: (
                a["images"].__setitem__((25, 3, 9, 9), np.inf),
                np.save(p / "x.npy", a["images"]),
                _spoil_none(p, a),
            ),
            "images hold NaN or inf (first at row 25)",
        ),
        (lambda p, a: ((p / "x.npy").write_bytes(b"\x93NUMPY broken"), []), "x.npy: cannot read"),
    ],
)
def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, make, message) -> None:
    arrays = survey(4)
    write_table(tmp_path / "cat.fits", arrays)
    *_, options = make(tmp_path, arrays)
    out = tmp_path / "shards"
    result = convert(str(tmp_path / "x.npy"), *options, "--out", str(out), "--shard-mb", "0.5")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def _spoil_none(tmp_path: Path, arrays: dict) -> list[str]:
    return ["--table", str(tmp_path / "cat.fits"), *TABLE_OPTIONS]
