"""Output files: prediction files, atomic writes and what a crash part-way leaves behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.errors import InputError
from cai_hpc.predictions import (
    is_complete,
    prediction_files,
    prediction_path,
    read_labelled,
    remove_stale_temporaries,
    write_predictions,
)
from cai_hpc.shards import ShardInfo, ShardReader, inspect_shard, write_shard
from cai_hpc.storage import Location
from cai_hpc.synth import synthesize

STAMP = {"checkpoint": "reference", "weights": "w-1"}


class InjectedCrashError(Exception):
    """Raised where a real run could die: a full disk, a failed read, a signal."""


def write(
    out: Location, shard: ShardInfo, pred: np.ndarray, stamp: dict[str, str], embeddings: np.ndarray | None = None
) -> Location:
    """write_predictions with the shard's own ids and labels for the rows, as the engine's reader hands them over."""
    with h5py.File(str(shard.path)) as src:
        carried = {name: src[name][: len(pred)] for name in ("object_id", "redshift") if name in src}
    return write_predictions(out, shard, pred, stamp, carried, embeddings)


@pytest.fixture
def out(tmp_path: Path) -> Location:
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    return Location(tmp_path / "out")


@pytest.fixture
def shard(small_dataset: Path) -> ShardInfo:
    return inspect_shard(small_dataset / "shard-00001.h5")  # 48 labelled rows with ids


def test_predictions_file_holds_the_shard_rows_and_is_complete_for_its_weights(out, shard, small_dataset) -> None:
    pred = np.linspace(0.0, 0.47, 48, dtype=np.float32)
    path = write(out, shard, pred, STAMP)
    assert path == out / "predictions" / "shard-00001.h5" == prediction_path(out, shard)
    assert path != out / "predictions" / "shard-00002.h5"
    assert sorted(p.name for p in (Path(out) / "predictions").iterdir()) == ["shard-00001.h5"]
    with h5py.File(small_dataset / "shard-00001.h5") as src, h5py.File(path) as f:
        assert dict(f.attrs) == {
            "format": "cai-hpc-predictions",
            "format_version": 1,
            "source": "shard-00001.h5",
            "source_rows": 48,
            "rows": 48,
            "checkpoint": "reference",
            "weights": "w-1",
        }
        assert f["redshift_pred"].dtype == np.float32
        np.testing.assert_array_equal(f["redshift_pred"][:], pred)
        np.testing.assert_array_equal(f["object_id"][:], src["object_id"][:])
        np.testing.assert_array_equal(f["redshift"][:], src["redshift"][:])
        labels = src["redshift"][:]
    assert is_complete(out, shard, 48, "w-1")
    assert not is_complete(out, shard, 49, "w-1")  # fewer rows than asked for
    assert not is_complete(out, shard, 48, "w-2")  # other weights
    got_pred, got_true = read_labelled(out, shard, 10)
    np.testing.assert_array_equal(got_pred, pred[:10])
    np.testing.assert_array_equal(got_true, labels[:10])


def _drop(name: str):
    def edit(f: h5py.File) -> None:
        del f.attrs[name]

    return edit


def _set(name: str, value: object):
    def edit(f: h5py.File) -> None:
        f.attrs[name] = value

    return edit


def _shorten_predictions(f: h5py.File) -> None:
    pred = f["redshift_pred"][:]
    del f["redshift_pred"]
    f["redshift_pred"] = pred[:-1]


def _edit_first(name: str):
    def edit(f: h5py.File) -> None:
        f[name][0] = f[name][0] + 1

    return edit


NOT_WHOLE = {
    "no completion marker (rows)": _drop("rows"),
    "no format": _drop("format"),
    "another format": _set("format", "cai-hpc-shard"),
    "from another shard": _set("source", "shard-00002.h5"),
    "from a shard of another length": _set("source_rows", 47),
    "no weights stamp": _drop("weights"),
    "no source length": _drop("source_rows"),
    "fewer predictions than rows": _shorten_predictions,
    "no predictions": lambda f: f.__delitem__("redshift_pred"),
    "labels of other galaxies": _edit_first("redshift"),
    "ids of other galaxies": _edit_first("object_id"),
    "no copied labels": lambda f: f.__delitem__("redshift"),
}


@pytest.mark.parametrize("case", sorted(NOT_WHOLE))
def test_a_file_that_is_not_whole_or_not_this_shards_is_not_complete(case, out, shard) -> None:
    path = write(out, shard, np.zeros(48, np.float32), STAMP)
    assert is_complete(out, shard, 48, "w-1")
    with h5py.File(path, "a") as f:
        NOT_WHOLE[case](f)
    assert not is_complete(out, shard, 48, "w-1")


@pytest.mark.parametrize("marker", ["rows", "source_rows"])
def test_a_one_row_file_without_its_lengths_is_not_complete(marker, out, small_dataset, tmp_path) -> None:
    source = tmp_path / "one" / "shard-00000.h5"
    source.parent.mkdir()
    with ShardReader(inspect_shard(small_dataset / "shard-00000.h5")) as reader:
        write_shard(source, reader.read(0, 1))
    shard = inspect_shard(source)
    path = write(out, shard, np.zeros(1, np.float32), STAMP)
    assert is_complete(out, shard, 1, "w-1")
    with h5py.File(path, "a") as f:
        del f.attrs[marker]
    assert not is_complete(out, shard, 1, "w-1")


def test_a_dataset_made_again_under_the_same_names_is_not_taken_for_finished(out, tmp_path) -> None:
    synthesize(tmp_path / "d", 48, 1.0, seed=1)
    first = inspect_shard(tmp_path / "d" / "shard-00000.h5")
    write(out, first, np.zeros(48, np.float32), STAMP)
    assert is_complete(out, first, 48, "w-1")
    shutil.rmtree(tmp_path / "d")
    synthesize(tmp_path / "d", 48, 1.0, seed=2)  # same name, same length, other galaxies
    again = inspect_shard(tmp_path / "d" / "shard-00000.h5")
    assert (again.name, again.rows) == (first.name, first.rows)
    assert not is_complete(out, again, 48, "w-1")


def test_a_file_that_is_not_hdf5_is_not_complete(out, shard) -> None:
    Path(prediction_path(out, shard)).write_bytes(b"\x89HDF\r\n\x1a\n cut short")
    assert not is_complete(out, shard, 1, "w-1")


def test_a_crash_inside_the_write_leaves_nothing_at_the_final_path(out, shard, monkeypatch) -> None:
    """The issue's case: the run dies after ``redshift_pred`` is written, before the labels."""
    create = h5py.Group.create_dataset
    at_crash: dict[str, object] = {}

    def crash_on_labels(group: h5py.Group, name: str, *args, **kwargs):
        if name != "redshift_pred":
            at_crash.update(group.file.attrs)
            raise InjectedCrashError(f"died before writing {name}")
        return create(group, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash_on_labels)
    with pytest.raises(InjectedCrashError):
        write(out, shard, np.zeros(48, np.float32), STAMP)
    monkeypatch.undo()
    assert list((Path(out) / "predictions").iterdir()) == []  # no final file, no temporary
    assert not is_complete(out, shard, 48, "w-1")
    # Had it been written in place, the completion marker would still be missing.
    assert at_crash["weights"] == "w-1" and "rows" not in at_crash


def test_a_crash_while_rewriting_keeps_the_previous_file(out, shard, monkeypatch) -> None:
    path = write(out, shard, np.full(48, 0.25, np.float32), STAMP)

    def crash(*args, **kwargs):
        raise InjectedCrashError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(InjectedCrashError):
        write(out, shard, np.full(48, 0.5, np.float32), {"checkpoint": "other", "weights": "w-2"})
    monkeypatch.undo()
    assert sorted(p.name for p in (Path(out) / "predictions").iterdir()) == [path.name]
    assert is_complete(out, shard, 48, "w-1")
    assert read_labelled(out, shard, 48)[0].tolist() == [0.25] * 48


def test_atomic_write_bytes_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch) -> None:
    target = Location(tmp_path / "summary.json")
    target.write_bytes(b"old")
    assert (tmp_path / "summary.json").read_bytes() == b"old"

    def crash(src, dst):
        raise InjectedCrashError(f"killed before renaming {src}")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(InjectedCrashError):
        target.write_bytes(b"new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert (tmp_path / "summary.json").read_bytes() == b"old"
    target.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert target.read_bytes() == b"new"


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(out, shard) -> None:
    predictions = Path(out) / "predictions"
    write(out, shard, np.zeros(48, np.float32), STAMP)
    stale = [".shard-00001.h5.tmp-4242", ".shard-00003.h5.tmp-7"]
    kept = ["shard-00001.h5", ".shard-00002.h5", "shard-00004.h5.tmp-9", ".notes.txt.tmp-3"]
    for name in stale + kept[1:]:
        (predictions / name).write_bytes(b"partial")
    remove_stale_temporaries(out)
    assert sorted(p.name for p in predictions.iterdir()) == sorted(kept)
    assert is_complete(out, shard, 48, "w-1")


def test_stale_temporaries_on_s3_and_in_a_new_output_need_nothing(tmp_path) -> None:
    remove_stale_temporaries(Location("s3://bucket/run"))  # a PUT leaves none; no request is made
    remove_stale_temporaries(Location(tmp_path / "fresh"))  # no predictions directory yet
    assert list(tmp_path.iterdir()) == []


def test_an_unlabelled_shard_gives_no_labels(out, small_dataset, tmp_path) -> None:
    source = tmp_path / "unlabelled" / "shard-00001.h5"
    source.parent.mkdir()
    shutil.copy(small_dataset / "shard-00001.h5", source)
    with h5py.File(source, "a") as f:
        del f["redshift"]
    shard = inspect_shard(source)
    write(out, shard, np.zeros(48, np.float32), STAMP)
    pred, true = read_labelled(out, shard, 48)
    assert (pred.size, true.size, pred.dtype, true.dtype) == (0, 0, np.float32, np.float32)
    with h5py.File(prediction_path(out, shard).path) as f:
        assert sorted(f) == ["object_id", "redshift_pred"]


def test_embeddings_are_stored_as_float32_and_complete_only_with_every_row(out, shard) -> None:
    # Six features per row (not the model's 3216): a shape that cannot be taken for the row count.
    features = np.arange(48 * 6, dtype=np.float64).reshape(48, 6) / 8
    path = write(out, shard, np.zeros(48, np.float32), STAMP, embeddings=features)
    with h5py.File(path) as f:
        assert (f["embeddings"].dtype, f["embeddings"].shape) == (np.float32, (48, 6))
        assert f["embeddings"][47].tolist() == [35.25, 35.375, 35.5, 35.625, 35.75, 35.875]
    assert is_complete(out, shard, 48, "w-1", embeddings=True)
    with h5py.File(path, "a") as f:
        kept = f["embeddings"][:47]
        del f["embeddings"]
        f["embeddings"] = kept  # a row short
    assert is_complete(out, shard, 48, "w-1") and not is_complete(out, shard, 48, "w-1", embeddings=True)
    write(out, shard, np.zeros(48, np.float32), STAMP)
    assert is_complete(out, shard, 48, "w-1") and not is_complete(out, shard, 48, "w-1", embeddings=True)


def test_a_runs_prediction_files_are_listed_in_shard_order_or_refused_in_one_line(out, shard, small_dataset) -> None:
    with pytest.raises(InputError) as empty:
        prediction_files(out)  # the directory is there, no file in it
    assert str(empty.value) == f"{out}: no predictions/*.h5 files (run 'cai-hpc infer --out {out}' first)"
    with pytest.raises(InputError, match="no predictions"):
        prediction_files(Path(out) / "nothing")
    write(out, inspect_shard(small_dataset / "shard-00002.h5"), np.zeros(48, np.float32), STAMP)
    write(out, shard, np.zeros(48, np.float32), STAMP)
    (Path(out) / "predictions" / ".shard-00003.h5").write_bytes(b"hidden")
    assert prediction_files(str(out)) == [
        out / "predictions" / "shard-00001.h5",
        out / "predictions" / "shard-00002.h5",
    ]
