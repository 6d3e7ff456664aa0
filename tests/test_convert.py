"""``cai-hpc convert``: the reference's .pt TensorDatasets to shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cai_hpc.cli import main
from cai_hpc.shards import ShardReader, scan_dataset


def make_pt(path: Path, n: int, channels_last: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, 64, 64, 5) if channels_last else (n, 5, 32, 32)
    arrays = {
        "images": rng.normal(size=shape).astype(np.float32),
        "magnitudes": rng.uniform(14, 20, (n, 5)),  # float64, as in the reference
        "redshift": rng.uniform(0, 0.4, (n, 1)).astype(np.float32),
    }
    torch.save(TensorDataset(*(torch.from_numpy(a) for a in arrays.values())), path)
    return arrays


def read_all(data: Path):
    infos = scan_dataset(data)
    cols = []
    for info in infos:
        with ShardReader(info) as r:
            cols.append(r.read(0, info.rows))
    return infos, cols


def test_convert_crops_reorders_and_shards_across_sources(tmp_path, capsys) -> None:
    a = make_pt(tmp_path / "a.pt", 30, channels_last=True)
    b = make_pt(tmp_path / "b.pt", 25, channels_last=False, seed=1)
    code = main(
        [
            "convert",
            str(tmp_path / "a.pt"),
            str(tmp_path / "b.pt"),
            "--out",
            str(tmp_path / "shards"),
            "--shard-mb",
            "0.5",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    infos, cols = read_all(tmp_path / "shards")
    assert [i.rows for i in infos] == [24, 24, 7]  # 0.5 MB shards hold 24 rows
    images = np.concatenate([c.images for c in cols])
    np.testing.assert_array_equal(images[:30], a["images"][:, 16:48, 16:48, :].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(images[30:], b["images"])
    mags = np.concatenate([c.magnitudes for c in cols])
    np.testing.assert_array_equal(mags, np.concatenate([a["magnitudes"], b["magnitudes"]]).astype(np.float32))
    z = np.concatenate([c.redshift for c in cols])
    np.testing.assert_array_equal(z, np.concatenate([a["redshift"], b["redshift"]]).ravel())


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda a: a.update(images=a["images"][:, :, :30]), "images have shape (10, 64, 30, 5)"),
        (lambda a: a.update(magnitudes=a["magnitudes"][:, :4]), "magnitudes have shape (10, 4), expected (10, 5)"),
        (lambda a: a["magnitudes"].__setitem__((6, 2), np.nan), "magnitudes holds NaN or inf (first at row 6)"),
    ],
)
def test_bad_source_is_refused_and_nothing_is_written(tmp_path, capsys, spoil, message) -> None:
    good = make_pt(tmp_path / "good.pt", 40, channels_last=True)
    arrays = make_pt(tmp_path / "bad.pt", 10, channels_last=True)
    spoil(arrays)
    torch.save(
        TensorDataset(*(torch.from_numpy(np.ascontiguousarray(v)) for v in arrays.values())), tmp_path / "bad.pt"
    )
    del good
    out = tmp_path / "shards"
    code = main(
        ["convert", str(tmp_path / "good.pt"), str(tmp_path / "bad.pt"), "--out", str(out), "--shard-mb", "0.5"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "bad.pt" in err[0] and message in err[0], err[0]
    assert not out.exists()


def test_truncated_source_is_refused(tmp_path, capsys) -> None:
    make_pt(tmp_path / "a.pt", 10, channels_last=False)
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    assert main(["convert", str(tmp_path / "a.pt"), "--out", str(tmp_path / "s")]) == 2
    assert "a.pt" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
