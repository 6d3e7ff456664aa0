"""Locations on S3 (moto's server on loopback): the same operations as on disk, with the
same results, every failure one line naming the location."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc import storage
from cai_hpc.errors import InputError
from cai_hpc.predictions import is_complete, prediction_files, read_labelled, write_predictions
from cai_hpc.shards import ShardReader, inspect_shard
from cai_hpc.storage import Location
from cai_hpc.synth import synthesize
from tests.conftest import moto_server

BUCKET = "where"


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    with moto_server():
        client = storage._s3()
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(autouse=True)
def no_fetched_copies() -> Iterator[None]:
    storage.forget()
    yield
    storage.forget()


def put(s3, key: str, body: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def test_an_s3_uri_is_parsed_into_bucket_and_key() -> None:
    where = Location("s3://b-1/runs/a/")
    assert (where.s3, where.bucket, where.key, str(where)) == (True, "b-1", "runs/a", "s3://b-1/runs/a")
    assert repr(where) == "Location('s3://b-1/runs/a')"
    assert str(where / "shard-00001.h5") == "s3://b-1/runs/a/shard-00001.h5"
    assert (where / "x.h5").name == "x.h5" and (where / "x.h5").stem == "x"
    root = Location("s3://b-1")
    assert (root.key, str(root), str(root / "k")) == ("", "s3://b-1", "s3://b-1/k")
    assert Location("s3://b-1/runs/a") == where and Location("runs/a") != where
    assert len({where, Location("s3://b-1/runs/a//")}) == 1
    edges = Location("s3://b-1/XrunX/")  # only slashes are trimmed
    assert (edges.key, edges.name, edges.stem) == ("XrunX", "XrunX", "XrunX")
    with pytest.raises(InputError) as no_bucket:
        Location("s3:///runs")
    assert str(no_bucket.value) == "s3:///runs: an S3 location needs a bucket (s3://bucket/prefix)"
    with pytest.raises(TypeError, match="s3://b-1/runs/a is not on local disk"):
        open(where)
    with pytest.raises(ValueError, match="s3://b-1/runs/a is not on local disk"):
        where.path  # noqa: B018 (the property is what raises)


def test_a_listing_holds_the_files_directly_under_the_prefix_sorted_hidden_ones_skipped(s3) -> None:
    for key, size in [("ds/b.h5", 3), ("ds/a.h5", 5), ("ds/.a.h5.tmp-1.h5", 1), ("ds/sub/c.h5", 1)]:
        put(s3, key, b"x" * size)
    put(s3, "ds/notes.txt", b"x")
    put(s3, "dsx/d.h5", b"x")  # a sibling prefix that starts with the same letters
    put(s3, "top.h5", b"xy")
    ds = Location(f"s3://{BUCKET}/ds")
    assert [str(p) for p in ds.list(".h5")] == [f"s3://{BUCKET}/ds/a.h5", f"s3://{BUCKET}/ds/b.h5"]
    assert [(p.name, size) for p, size in ds.list_sized(".h5")] == [("a.h5", 5), ("b.h5", 3)]
    assert [p.name for p in Location(f"s3://{BUCKET}/ds/").list(".txt")] == ["notes.txt"]
    assert [p.name for p in Location(f"s3://{BUCKET}").list(".h5")] == ["top.h5"]  # the bucket's own files
    assert Location(f"s3://{BUCKET}/nothing").list(".h5") == []
    assert ds.is_dir() and Location(f"s3://{BUCKET}/ds/sub").is_dir()
    assert not Location(f"s3://{BUCKET}/d").is_dir()  # a prefix of a name is not a directory
    assert not Location(f"s3://{BUCKET}/nothing").is_dir()


def test_reads_come_from_one_fetch_until_released_and_a_write_replaces_them(s3) -> None:
    put(s3, "r/a.bin", b"first")
    where = Location(f"s3://{BUCKET}/r/a.bin")
    assert where.exists() and where.read_bytes() == b"first" and where.exists()
    put(s3, "r/a.bin", b"second")  # by another process: this one keeps the copy it read
    assert where.read_bytes() == b"first"
    where.release()
    assert where.read_bytes() == b"second"
    where.write_bytes(b"third")  # by this process: its copy is dropped
    assert where.read_bytes() == b"third"
    assert s3.get_object(Bucket=BUCKET, Key="r/a.bin")["Body"].read() == b"third"
    storage.forget()
    put(s3, "r/a.bin", b"fourth")
    assert where.read_bytes() == b"fourth"
    assert where.etag() == hashlib.md5(b"fourth").hexdigest()  # a single PUT's ETag, unquoted


def test_a_missing_object_does_not_exist_and_reading_it_is_one_line(s3) -> None:
    missing = Location(f"s3://{BUCKET}/r/missing.bin")
    assert not missing.exists()
    with pytest.raises(InputError) as bad:
        missing.read_bytes()
    assert str(bad.value) == f"s3://{BUCKET}/r/missing.bin: S3 refused: NoSuchKey: The specified key does not exist."
    with pytest.raises(InputError) as no_etag:
        missing.etag()
    assert str(no_etag.value) == f"s3://{BUCKET}/r/missing.bin: S3 refused: 404: Not Found"  # HEAD: no body
    assert not Location("s3://no-such-bucket/x").exists()
    Location(f"s3://{BUCKET}/out").make_dir()  # nothing to make, the bucket answers
    with pytest.raises(InputError) as no_bucket:
        Location("s3://no-such-bucket/out").make_dir()
    assert str(no_bucket.value) == "s3://no-such-bucket/out: S3 refused: 404: Not Found"


def test_an_hdf5_file_appears_on_s3_only_when_its_block_succeeds(s3) -> None:
    where = Location(f"s3://{BUCKET}/h/pred.h5")
    with pytest.raises(RuntimeError, match="killed"), where.writing_h5() as f:
        f["x"] = np.arange(3)
        raise RuntimeError("killed")
    assert not where.exists()
    with where.writing_h5() as f:
        f.attrs["rows"] = 3
        f["x"] = np.arange(3.0)
    assert where.exists() and not storage._fetched
    with where.open_h5(header_only=True) as f:
        assert f.attrs["rows"] == 3 and f["x"][:].tolist() == [0.0, 1.0, 2.0]
    assert not storage._fetched  # ranged reads: nothing kept
    with where.open_h5() as f:
        assert f["x"][1] == 1.0
    assert list(storage._fetched) == [str(where)]
    with where.open_h5(header_only=True) as f:  # a fetched copy is used, not fetched in pieces
        assert f["x"][2] == 2.0


def test_a_shard_on_s3_is_checked_through_its_header(s3, small_dataset) -> None:
    s3.upload_file(str(small_dataset / "shard-00006.h5"), BUCKET, "data/shard-00006.h5")
    info = inspect_shard(f"s3://{BUCKET}/data/shard-00006.h5")
    assert (info.rows, info.labelled, info.has_object_id, info.name) == (12, True, True, "shard-00006.h5")
    assert not storage._fetched


def test_a_ranged_object_reads_and_seeks_like_a_file(s3) -> None:
    put(s3, "r/digits", b"0123456789")
    raw = storage._RangedObject(Location(f"s3://{BUCKET}/r/digits"))
    assert raw.readable() and raw.seekable() and raw.tell() == 0
    assert raw.read(4) == b"0123" and raw.tell() == 4
    assert raw.seek(3, io.SEEK_CUR) == 7 and raw.read(100) == b"789"
    assert raw.read(1) == b"" and raw.tell() == 10
    assert raw.seek(-4, io.SEEK_END) == 6 and raw.read(2) == b"67"
    assert raw.seek(-20, io.SEEK_CUR) == 0 and raw.read(1) == b"0"
    assert raw.seek(12) == 12 and raw.read(3) == b""


def test_the_s3_endpoint_variable_wins_over_the_general_one(s3, monkeypatch) -> None:
    put(s3, "r/e", b"e")
    endpoint = storage.os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing answers there
    assert Location(f"s3://{BUCKET}/r/e").read_bytes() == b"e"


def test_no_credentials_is_one_line(s3, monkeypatch, tmp_path) -> None:
    # Another spelling of the endpoint and a new default session: a client made without credentials.
    monkeypatch.setattr("boto3.DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", storage.os.environ["AWS_ENDPOINT_URL"].replace("127.0.0.1", "localhost"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InputError) as bad:
        Location(f"s3://{BUCKET}/r/e").read_bytes()
    assert str(bad.value) == f"s3://{BUCKET}/r/e: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/...)"


def test_prediction_files_on_s3_are_checked_and_read_without_keeping_them(s3, small_dataset) -> None:
    shard = inspect_shard(small_dataset / "shard-00006.h5")
    out = Location(f"s3://{BUCKET}/run")
    pred = np.linspace(0.0, 0.55, 12, dtype=np.float32)
    with h5py.File(shard.path.path) as src:
        labels, ids = src["redshift"][:], src["object_id"][:]
    write_predictions(out, shard, pred, {"weights": "w-1"}, {"redshift": labels, "object_id": ids})
    assert prediction_files(out) == [Location(f"s3://{BUCKET}/run/predictions/shard-00006.h5")]
    assert is_complete(out, shard, 12, "w-1") and not is_complete(out, shard, 12, "w-2")
    got_pred, got_true = read_labelled(out, shard, 5)
    assert got_pred.tolist() == pred[:5].tolist() and got_true.tolist() == labels[:5].tolist()
    assert not storage._fetched  # checked and read through byte ranges: no file kept in memory


def test_an_unreachable_endpoint_is_one_line(s3, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard: nothing answers there
    with pytest.raises(InputError) as bad:
        Location(f"s3://{BUCKET}/r/e").read_bytes()
    assert str(bad.value) == (
        f's3://{BUCKET}/r/e: S3 unreachable: Could not connect to the endpoint URL: "http://127.0.0.1:9/{BUCKET}/r/e"'
    )
    with pytest.raises(InputError) as no_answer:
        Location(f"s3://{BUCKET}/r/e").exists()  # not "missing": nothing answered
    assert str(no_answer.value).startswith(f"s3://{BUCKET}/r/e: S3 unreachable: ")
    with pytest.raises(InputError) as no_listing:
        Location(f"s3://{BUCKET}/r").is_dir()
    assert str(no_listing.value).startswith(f"s3://{BUCKET}/r: S3 unreachable: ")


def test_failures_while_writing_or_reading_in_ranges_name_the_object(s3) -> None:
    with pytest.raises(InputError) as no_bucket:
        Location("s3://no-such-bucket/run/summary.json").write_bytes(b"{}")
    assert str(no_bucket.value) == (
        "s3://no-such-bucket/run/summary.json: S3 refused: NoSuchBucket: The specified bucket does not exist"
    )
    with pytest.raises(InputError) as no_key:
        Location(f"s3://{BUCKET}/r/none.h5").open_h5(header_only=True)
    assert str(no_key.value) == f"s3://{BUCKET}/r/none.h5: S3 refused: 404: Not Found"
    put(s3, "r/gone", b"0123")
    raw = storage._RangedObject(Location(f"s3://{BUCKET}/r/gone"))
    s3.delete_object(Bucket=BUCKET, Key="r/gone")  # between the header check and the read
    with pytest.raises(InputError) as gone:
        raw.read(2)
    assert str(gone.value) == f"s3://{BUCKET}/r/gone: S3 refused: NoSuchKey: The specified key does not exist."


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard of 600 rows, about 12 MB."""
    out = tmp_path_factory.mktemp("big") / "data"
    synthesize(out, 600, 20.0, seed=3)
    (shard,) = sorted(out.glob("*.h5"))
    return shard


def _gets(s3) -> list[dict]:
    """The parameters of every GetObject call the client makes from now on."""
    calls: list[dict] = []
    s3.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: calls.append(dict(params)))
    return calls


def test_a_rank_reading_part_of_an_s3_shard_fetches_about_its_rows_not_the_shard(s3, big_shard, monkeypatch) -> None:
    monkeypatch.setattr(storage, "PIECE_BLOCK", 256 << 10)  # blocks of a chunk: the test's shard is small
    s3.upload_file(str(big_shard), BUCKET, "part/big.h5")
    size = big_shard.stat().st_size
    info = inspect_shard(f"s3://{BUCKET}/part/big.h5")
    assert info.rows == 600
    local = inspect_shard(big_shard)
    calls = _gets(s3)
    with ShardReader(info, part=True) as remote, ShardReader(local) as disk:
        for start in range(480, 600, 40):  # the last fifth, in batches, as the engine reads it
            got, want = remote.read(start, start + 40), disk.read(start, start + 40)
            for name in ("images", "magnitudes", "redshift", "object_id"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert not storage._fetched  # nothing held whole
    spans = [tuple(int(b) for b in c["Range"].removeprefix("bytes=").split("-")) for c in calls]
    assert len(spans) == len(calls) and all(c.get("Range") for c in calls)  # every GET is ranged
    fetched = sum(last - first + 1 for first, last in spans)
    assert fetched < size / 2, (fetched, size)


def test_a_rank_reading_a_whole_s3_shard_fetches_it_once(s3, big_shard) -> None:
    s3.upload_file(str(big_shard), BUCKET, "whole/big.h5")
    info = inspect_shard(f"s3://{BUCKET}/whole/big.h5")
    calls = _gets(s3)
    with ShardReader(info) as remote:
        for start in range(0, 600, 100):
            remote.read(start, start + 100)
    assert [c.get("Range") for c in calls] == [None]
    assert list(storage._fetched) == [str(info.path)]


def test_an_s3_shard_replaced_while_a_part_of_it_is_read_is_one_line_not_a_mix(s3, big_shard, monkeypatch) -> None:
    monkeypatch.setattr(storage, "PIECE_BLOCK", 256 << 10)
    s3.upload_file(str(big_shard), BUCKET, "moving/big.h5")
    info = inspect_shard(f"s3://{BUCKET}/moving/big.h5")
    with ShardReader(info, part=True) as remote:
        remote.read(0, 10)
        put(s3, "moving/big.h5", big_shard.read_bytes()[::-1])
        with pytest.raises(InputError) as replaced:
            remote.read(590, 600)  # another block: a GET naming the old ETag
    assert str(replaced.value) == f"{info.path}: the object was replaced while it was being read"


def test_ranged_reads_cross_blocks_and_keep_the_last_few(s3) -> None:
    put(s3, "r/hex", b"0123456789abcdef")
    calls = _gets(s3)
    raw = storage._RangedObject(Location(f"s3://{BUCKET}/r/hex"), block=4, kept=2)
    assert raw.read(6) == b"012345"  # blocks 0 and 1
    assert raw.seek(2) == 2 and raw.read(5) == b"23456"  # both kept: no GET
    assert raw.seek(13) == 13 and raw.read(10) == b"def"  # block 3, the last, short of the end
    assert raw.seek(0) == 0 and raw.read(1) == b"0"  # block 0 made room for block 3
    ranges = [c["Range"] for c in calls]
    assert ranges == ["bytes=0-3", "bytes=4-7", "bytes=12-15", "bytes=0-3"]
