"""Reading shards: every value a run uses is checked, naming the file, the dataset and the row."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.errors import InputError
from cai_hpc.shards import (
    Columns,
    DatasetWriter,
    ShardReader,
    ShardWriter,
    _open_failure,
    _short,
    _slice,
    inspect_shard,
    rows_per_shard,
    write_shard,
)


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
            np.testing.assert_array_equal(f["magnitudes"][:, 2], f["object_id"][:] - 100)
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


def _columns(n: int, labelled: bool = True, ids: bool = True) -> Columns:
    """Rows whose every value is its row number (labels a tenth of it, ids 100 more)."""
    rows = np.arange(n, dtype=np.float32)
    return Columns(
        np.broadcast_to(rows[:, None, None, None], (n, 5, 32, 32)).copy(),
        np.repeat(rows[:, None], 5, axis=1),
        rows / 10 if labelled else None,
        np.arange(100, 100 + n, dtype=np.int64) if ids else None,
    )


@pytest.mark.parametrize("labelled, ids", [(True, True), (True, False), (False, True), (False, False)])
def test_a_whole_shard_keeps_its_labels_ids_and_attributes(labelled, ids, tmp_path) -> None:
    path = tmp_path / "shard-00000.h5"
    write_shard(path, _columns(3, labelled, ids), {"survey": "synthetic", "seed": 7})
    info = inspect_shard(path)
    assert (info.rows, info.labelled, info.has_object_id, info.version) == (3, labelled, ids, 1)
    with h5py.File(path) as f:
        assert dict(f.attrs) == {"format": "cai-hpc-shard", "format_version": 1, "survey": "synthetic", "seed": 7}
        assert f["magnitudes"][:, 4].tolist() == [0.0, 1.0, 2.0]
        assert ("redshift" in f, "object_id" in f) == (labelled, ids)
        if labelled:
            assert f["redshift"][:].tolist() == pytest.approx([0.0, 0.1, 0.2], abs=1e-7)
        if ids:
            assert f["object_id"][:].tolist() == [100, 101, 102]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_shard_size_in_rows_from_megabytes() -> None:
    # A sample is 4 × (5 × 32 × 32 + 5 + 1) + 8 = 20,512 bytes.
    assert rows_per_shard(25) == 1218  # 25,000,000 // 20,512
    assert rows_per_shard(0.041024) == 2  # exactly two samples
    assert rows_per_shard(0.041023) == 1
    assert rows_per_shard(0.041023999) == 1  # 41,023.999 bytes (megabytes are 10^6 bytes)
    assert rows_per_shard(0.001) == 1  # at least one
    for bad in (0, -2.5):
        with pytest.raises(InputError) as refused:
            rows_per_shard(bad)
        assert str(refused.value) == f"--shard-mb must be positive, got {bad}"


def test_a_dataset_that_fails_part_way_leaves_no_directory_it_made(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="bad input"), DatasetWriter(tmp_path / "new", 7, 3, True, True) as w:
        w.add(_columns(4))  # shard 0 done, shard 1 open
        raise RuntimeError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_that_fails_part_way_leaves_a_directory_it_found_as_it_was(tmp_path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="bad input"), DatasetWriter(out, 7, 3, True, True) as w:
        w.add(_columns(4))
        raise RuntimeError("bad input")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_dataset_given_fewer_rows_than_announced_is_refused_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError) as short, DatasetWriter(tmp_path / "d", 7, 3, True, True) as w:
        w.add(_columns(6))  # two whole shards, the third never comes
    assert str(short.value) == "dataset writer got 6 rows, expected 7"
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_of_no_rows_has_no_shards(tmp_path) -> None:
    with DatasetWriter(tmp_path / "d", 0, 3, True, True) as w:
        assert w.shard_count == 0
    assert list((tmp_path / "d").iterdir()) == []


def test_a_directory_that_holds_shards_is_refused(small_dataset) -> None:
    with pytest.raises(InputError) as refused:
        DatasetWriter(small_dataset, 1, 1, True, True)
    assert str(refused.value) == f"{small_dataset}: already holds shards; write a dataset into an empty directory"


@pytest.mark.parametrize(
    "shards, first", [(3, "shard-00000.h5"), (100_000, "shard-00000.h5"), (100_001, "shard-000000.h5")]
)
def test_shard_names_have_five_digits_or_as_many_as_the_last_index(shards, first, tmp_path) -> None:
    out = tmp_path / "d"
    with pytest.raises(RuntimeError, match="stop"), DatasetWriter(out, shards, 1, False, False) as w:
        assert w.shard_count == shards
        w.add(_columns(1, labelled=False, ids=False))
        staged = [p.name for p in out.glob(".staging-*/*")]  # staged until the whole dataset is written
        raise RuntimeError("stop")
    assert staged == [first]


@pytest.mark.parametrize(
    "forced, hint",
    [(None, ""), ("TRUE", "; HDF5_USE_FILE_LOCKING=TRUE asks for locks that cai-hpc does not need: unset it")],
)
def test_a_refused_file_lock_is_named_as_one(forced, hint, monkeypatch) -> None:
    if forced is None:
        monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    else:
        monkeypatch.setenv("HDF5_USE_FILE_LOCKING", forced)
    lock = OSError("[Errno 37] Unable to synchronously open file (unable to lock file, errno = 37)\nmore")
    assert _open_failure(lock) == (
        "cannot open: the filesystem refused a file lock "
        f"([Errno 37] Unable to synchronously open file (unable to lock file, errno = 37)){hint}"
    )
    unlock = OSError("Unable to close file (Unable to UNLOCK file, errno = 11)")
    assert _open_failure(unlock).startswith("cannot open: the filesystem refused a file lock (")
    damaged = OSError("Unable to synchronously open file (file signature not found)\nmore")
    assert _open_failure(damaged) == (
        "not a readable HDF5 file (truncated or corrupt?): Unable to synchronously open file (file signature not found)"
    )


def test_a_damaged_chunk_index_is_one_line_naming_the_rows(small_dataset, tmp_path) -> None:
    path = tmp_path / "shard-00001.h5"
    data = bytearray((small_dataset / path.name).read_bytes())
    at = data.rindex(b"TREE")  # the last B-tree: a dataset's chunk index (the first is the root group's)
    data[at : at + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with ShardReader(inspect_shard(path)) as reader, pytest.raises(InputError) as bad:  # the header is sound
        reader.read(3, 9)
    assert str(bad.value) == (
        f"{path}: cannot read rows 3:9 (truncated or corrupt?): Can't synchronously read data (wrong B-tree signature)"
    )


def test_a_shard_that_cannot_be_opened_any_more_is_one_line(small_dataset, tmp_path) -> None:
    path = tmp_path / "shard-00001.h5"
    shutil.copy(small_dataset / path.name, path)
    info = inspect_shard(path)
    path.write_bytes(b"replaced since it was checked")
    with pytest.raises(InputError) as bad:
        ShardReader(info)
    assert str(bad.value) == (
        f"{path}: not a readable HDF5 file (truncated or corrupt?): "
        "Unable to synchronously open file (file signature not found)"
    )


def test_a_shard_without_labels_or_ids_reads_without_them(tmp_path) -> None:
    path = tmp_path / "shard-00000.h5"
    write_shard(path, _columns(3, labelled=False, ids=False))
    with ShardReader(inspect_shard(path)) as reader:
        cols = reader.read(1, 3)
        assert (cols.redshift, cols.object_id) == (None, None)
        assert cols.magnitudes[:, 0].tolist() == [1.0, 2.0]
        assert reader.read(0, 3, images=False).images.dtype == np.float32


def test_chunks_hold_at_most_256_kib_so_a_slab_reads_little_more_than_itself(tmp_path) -> None:
    with ShardWriter(tmp_path / "shard-00000.h5", 100, labelled=True, has_object_id=True) as w:
        w.write(0, _columns(100))
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        # An image row is 20,480 bytes: 12 rows to a chunk; the small columns fit whole.
        assert {name: f[name].chunks for name in f} == {
            "images": (12, 5, 32, 32),
            "magnitudes": (100, 5),
            "redshift": (100,),
            "object_id": (100,),
        }
