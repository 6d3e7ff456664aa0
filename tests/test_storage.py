"""Locations on local disk: names, listings, reads and atomic writes, every failure one line."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc.errors import InputError
from cai_hpc.storage import Location


def test_a_local_location_is_its_path(tmp_path) -> None:
    where = Location(tmp_path / "run")
    assert (where.s3, str(where), os.fspath(where), where.path) == (
        False,
        f"{tmp_path}/run",
        f"{tmp_path}/run",
        tmp_path / "run",
    )
    assert repr(where) == f"Location('{tmp_path}/run')"
    assert str(where / "predictions" / "shard-00001.h5") == f"{tmp_path}/run/predictions/shard-00001.h5"
    shard = where / "shard-00001.h5"
    assert (shard.name, shard.stem) == ("shard-00001.h5", "shard-00001")
    assert Location(f"{tmp_path}/run/").name == "run" and Location(f"{tmp_path}/XrunX").name == "XrunX"
    assert Location(where) == where and hash(Location(str(where))) == hash(where)
    assert where != Location(tmp_path / "other") and where != str(where)


def test_a_listing_holds_the_files_directly_inside_sorted_hidden_ones_skipped(tmp_path) -> None:
    for name, size in [("b.h5", 3), ("a.h5", 5), (".a.h5", 1), ("notes.txt", 1)]:
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / "dir.h5").mkdir()
    (tmp_path / "dir.h5" / "c.h5").write_bytes(b"x")
    where = Location(tmp_path)
    assert where.list(".h5") == [where / "a.h5", where / "b.h5"]
    assert where.list_sized(".h5") == [(where / "a.h5", 5), (where / "b.h5", 3)]
    assert where.is_dir() and not (where / "a.h5").is_dir() and not (where / "none").is_dir()
    assert (where / "a.h5").exists() and not (where / "dir.h5").exists() and not (where / "none").exists()


def test_reading_a_missing_file_is_one_line(tmp_path) -> None:
    with pytest.raises(InputError) as missing:
        Location(tmp_path / "none.json").read_bytes()
    assert str(missing.value) == f"{tmp_path}/none.json: cannot read: No such file or directory"


def test_writes_make_the_whole_file_and_nothing_else(tmp_path) -> None:
    out = Location(tmp_path / "a" / "b")
    out.make_dir()
    out.make_dir()  # already there: fine
    (out / "x.json").write_bytes(b"{}")
    with (out / "p.h5").writing_h5() as f:
        f["x"] = np.arange(3)
        # Hidden, and named as remove_stale_temporaries expects if the process dies here.
        assert sorted(p.name for p in Path(out).iterdir()) == [f".p.h5.tmp-{os.getpid()}", "x.json"]
        assert out.list(".h5") == []
    with pytest.raises(RuntimeError, match="killed"), (out / "q.h5").writing_h5() as f:
        f["x"] = np.arange(3)
        raise RuntimeError("killed")
    assert sorted(p.name for p in Path(out).iterdir()) == ["p.h5", "x.json"]
    assert (out / "x.json").read_bytes() == b"{}"
    with (out / "p.h5").open_h5() as f:
        assert f["x"][:].tolist() == [0, 1, 2]
    with (out / "p.h5").h5_header() as fid:
        assert h5py.h5d.open(fid, b"x").shape == (3,)
