"""Reading shards: every value a run uses is checked, naming the file, the dataset and the row."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.errors import InputError
from cai_hpc.shards import Columns, DatasetWriter, ShardReader, ShardWriter, _short, _slice, inspect_shard


def _shard_with(small_dataset: Path, tmp_path: Path, dataset: str, index: tuple, value: float) -> Path:
    path = tmp_path / "shard-00001.h5"
    shutil.copy(small_dataset / "shard-00001.h5", path)
    with h5py.File(path, "a") as f:
        f[dataset][index] = value
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_label_is_refused_naming_its_row(value, small_dataset, tmp_path) -> None:
    path = _shard_with(small_dataset, tmp_path, "redshift", (5,), value)
    with ShardReader(inspect_shard(path)) as reader:
        message = f"{path}: dataset 'redshift' holds NaN or inf (first at row 5)"
        with pytest.raises(InputError) as whole:
            reader.read(0, 48)
        with pytest.raises(InputError) as labels_only:
            reader.read(2, 10, images=False)
        assert str(whole.value) == str(labels_only.value) == message
        assert reader.read(6, 48).redshift.size == 42  # rows after it read fine


def test_the_first_bad_row_is_named_when_several_are_bad(small_dataset, tmp_path) -> None:
    path = _shard_with(small_dataset, tmp_path, "magnitudes", (40, 4), np.nan)
    with h5py.File(path, "a") as f:
        f["magnitudes"][33, 0] = -np.inf
    with ShardReader(inspect_shard(path)) as reader, pytest.raises(InputError) as bad:
        reader.read(30, 48, images=False)
    assert str(bad.value) == f"{path}: dataset 'magnitudes' holds NaN or inf (first at row 33)"


def test_a_clean_slab_reads_the_shard_rows(small_dataset) -> None:
    path = small_dataset / "shard-00001.h5"
    with ShardReader(inspect_shard(path)) as reader, h5py.File(path, locking=False) as f:  # as the reader opens it
        cols = reader.read(10, 20)
        np.testing.assert_array_equal(cols.images, f["images"][10:20])
        np.testing.assert_array_equal(cols.magnitudes, f["magnitudes"][10:20])
        np.testing.assert_array_equal(cols.redshift, f["redshift"][10:20])
        np.testing.assert_array_equal(cols.object_id, f["object_id"][10:20])
        assert reader.read(0, 4, images=False).images.shape == (0, 5, 32, 32)


def test_a_shard_writer_that_fails_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "shard-00000.h5"
    cols = Columns(np.zeros((2, 5, 32, 32), np.float32), np.zeros((2, 5), np.float32), None, None)
    with pytest.raises(RuntimeError, match="killed"), ShardWriter(path, 4, labelled=False, has_object_id=False) as w:
        w.write(0, cols)
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(path, 2, labelled=False, has_object_id=False) as w:
        w.write(0, cols)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    info = inspect_shard(path)
    assert (info.rows, info.labelled, info.has_object_id) == (2, False, False)


def test_slabs_that_straddle_shard_boundaries_land_in_order(tmp_path) -> None:
    rows = np.arange(7, dtype=np.float32)
    cols = Columns(
        np.broadcast_to(rows[:, None, None, None], (7, 5, 32, 32)).copy(),
        np.repeat(rows[:, None], 5, axis=1),
        rows / 10,
        np.arange(100, 107, dtype=np.int64),
    )
    (tmp_path / "d").mkdir()  # an empty directory is a fine place for a dataset
    with DatasetWriter(tmp_path / "d", 7, 3, labelled=True, has_object_id=True) as writer:
        writer.add(_slice(cols, 0, 5))  # shard 0 and two rows of shard 1
        writer.add(_slice(cols, 5, 7))  # the last row of shard 1 and shard 2
    shards = sorted((tmp_path / "d").iterdir())
    assert [p.name for p in shards] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    ids = []
    for path in shards:
        with h5py.File(path) as f:
            ids.append(f["object_id"][:].tolist())
            np.testing.assert_array_equal(f["images"][:, 3, 4, 5], f["object_id"][:] - 100)
            np.testing.assert_array_equal(f["redshift"][:], (f["object_id"][:] - 100).astype(np.float32) / 10)
    assert ids == [[100, 101, 102], [103, 104, 105], [106]]
    unlabelled = Columns(cols.images, cols.magnitudes, None, None)
    with DatasetWriter(tmp_path / "u", 7, 3, labelled=False, has_object_id=False) as writer:
        writer.add(_slice(unlabelled, 0, 5))
        writer.add(_slice(unlabelled, 5, 7))
    assert [inspect_shard(p).rows for p in sorted((tmp_path / "u").iterdir())] == [3, 3, 1]


def test_a_dataset_directory_that_cannot_be_made_is_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(InputError) as bad, DatasetWriter(tmp_path / "file" / "d", 1, 1, False, False):
        pass
    assert str(bad.value).startswith(f"{tmp_path / 'file' / 'd'}: cannot create the dataset directory: ")


def test_h5py_errors_are_cut_to_their_first_line() -> None:
    assert _short(OSError("Unable to open file\n  (truncated file: eof = 5000)")) == "Unable to open file"
    assert _short(KeyError()) == "KeyError"
