"""Where datasets and outputs live: a local directory or an S3 prefix, used the same way.

A ``Location`` is a path on local disk or an ``s3://bucket/key`` URI. Local shards are read
straight from disk (streamed by h5py). An S3 shard a rank reads whole is fetched whole into
memory, once per process, since a Lambda function has no disk to spare; a rank that reads only
part of a shard (the plan splits big shards between ranks) fetches the byte ranges HDF5 reads
for those rows, in blocks of a few MiB of which a few are kept, so its memory and transfer stay
near its own rows'. Checking a file's header takes only the ranges HDF5 reads, in small
blocks. Ranged reads name the object's ETag, so an object replaced while it is read is an
error, never a mix of two versions. Writes are
atomic on both: a temporary file renamed into place, or one S3 PUT, so a reader never sees a
half-written file.

HDF5 files are opened without HDF5's file locks: inputs are only read, and outputs are
private temporary files renamed into place, so a lock protects nothing here, while on a
filesystem without working locks (NFS without a lock daemon, Lustre without ``-o flock``)
taking one fails the open.

boto3 is imported only when an S3 location is first touched, so local runs never load it.
The client takes its endpoint, region and credentials from boto3's standard chain
(``AWS_ENDPOINT_URL_S3`` points it at a local S3 such as moto's server).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import h5py

from cai_hpc.errors import InputError

S3 = "s3://"
HEADER_BLOCK = 64 << 10  # bytes per ranged GET when only a file's header is read: HDF5 keeps it near the start
# Bytes per ranged GET when a reader takes part of an object, and blocks kept: the images'
# chunks come in order, and the few blocks kept spare a refetch when the smaller columns
# (magnitudes, labels) are read in between.
PIECE_BLOCK, PIECE_BLOCKS_KEPT = 4 << 20, 4
# S3 objects fetched by this process (location -> bytes); see ``forget``.
_fetched: dict[str, bytes] = {}


class Location:
    """A file or directory on local disk or in S3, with the few operations the engine needs."""

    def __init__(self, where: str | Path | Location) -> None:
        text = str(where)
        self.s3 = text.startswith(S3)
        if self.s3:
            self.bucket, _, self.key = text[len(S3) :].partition("/")
            self.key = self.key.strip("/")
            if not self.bucket:
                raise InputError(f"{text}: an S3 location needs a bucket (s3://bucket/prefix)")
            self.text = f"{S3}{self.bucket}/{self.key}" if self.key else f"{S3}{self.bucket}"
        else:
            self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Location({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __fspath__(self) -> str:
        if self.s3:
            raise TypeError(f"{self.text} is not on local disk")
        return self.text

    def __truediv__(self, name: str) -> Location:
        if self.s3:
            return Location(f"{self.text}/{name}")
        return Location(os.path.join(self.text, name))  # not pathlib: planning makes 100,000s

    @property
    def name(self) -> str:
        return self.text.rstrip("/").rpartition("/")[2]

    @property
    def stem(self) -> str:
        return os.path.splitext(self.name)[0]

    @property
    def path(self) -> Path:
        """The local path (only for local locations)."""
        if self.s3:
            raise ValueError(f"{self.text} is not on local disk")
        return Path(self.text)

    # ------------------------------------------------------------------ reading
    def list(self, suffix: str) -> list[Location]:
        """Files directly inside this directory or prefix ending in ``suffix``, hidden ones
        skipped, sorted by name (every S3 listing page is read)."""
        if not self.s3:  # names only: no stat per file, which counts at 40,000 shards
            return sorted(self._local_files(suffix), key=lambda where: where.name)
        return [where for where, _ in self.list_sized(suffix)]

    def list_sized(self, suffix: str) -> list[tuple[Location, int]]:
        """``list`` with each file's size in bytes (from the same S3 listing: no extra requests)."""
        if not self.s3:
            found = [(where, where.path.stat().st_size) for where in self._local_files(suffix)]
        else:
            found = []
            for obj in self.objects():
                name = obj["Key"][len(self._prefix()) :]
                if "/" not in name and name.endswith(suffix) and not name.startswith("."):
                    found.append((self / name, obj["Size"]))
        return sorted(found, key=lambda item: item[0].name)

    def _local_files(self, suffix: str) -> list[Location]:
        with os.scandir(self.text) as entries:
            return [
                Location(entry.path)
                for entry in entries
                if entry.name.endswith(suffix) and entry.name[0] != "." and entry.is_file()
            ]

    def objects(self) -> Iterator[dict[str, Any]]:
        """Every S3 object under this prefix (``Key``, ``Size``, ...), page after page."""
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._prefix())
        with _s3_errors(self):
            for page in pages:
                yield from page.get("Contents", [])

    def is_dir(self) -> bool:
        if not self.s3:
            return Path(self.text).is_dir()
        with _s3_errors(self):
            reply = _s3().list_objects_v2(Bucket=self.bucket, Prefix=self._prefix(), MaxKeys=1)
        return reply.get("KeyCount", 0) > 0

    def exists(self) -> bool:
        if not self.s3:
            return Path(self.text).is_file()
        if self.text in _fetched:
            return True
        from botocore.exceptions import ClientError

        try:
            with _s3_errors(self, missing_ok=True):
                _s3().head_object(Bucket=self.bucket, Key=self.key)
        except ClientError:
            return False
        return True

    def etag(self) -> str:
        """The S3 object's ETag: changes whenever the object is replaced."""
        with _s3_errors(self):
            return _s3().head_object(Bucket=self.bucket, Key=self.key)["ETag"].strip('"')

    def read_bytes(self) -> bytes:
        if not self.s3:
            try:
                return Path(self.text).read_bytes()
            except OSError as exc:
                raise InputError(f"{self.text}: cannot read: {exc.strerror}") from None
        if self.text not in _fetched:
            with _s3_errors(self):
                _fetched[self.text] = _s3().get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        return _fetched[self.text]

    def open_h5(self, header_only: bool = False, part: bool = False) -> h5py.File:
        """The HDF5 file, read-only: from disk, or from this process's in-memory copy of the
        S3 object. Unless a copy is held, S3 is read in byte ranges instead: ``header_only``,
        to read attributes, dtypes and shapes (so checking a thousand shards downloads none
        whole); ``part``, to read some rows of a big file (without holding all of it)."""
        if not self.s3:
            return h5py.File(self.text, "r", locking=False)
        if self.text not in _fetched:
            if header_only:
                return h5py.File(_RangedObject(self, HEADER_BLOCK, 16), "r", locking=False)
            if part:
                return h5py.File(_RangedObject(self, PIECE_BLOCK, PIECE_BLOCKS_KEPT), "r", locking=False)
        return h5py.File(io.BytesIO(self.read_bytes()), "r", locking=False)

    @contextmanager
    def h5_header(self) -> Iterator[h5py.h5f.FileID]:
        """The file's low-level HDF5 id, to read its header (attributes, dtypes, shapes): on
        disk opened through HDF5's C API directly (a third of ``h5py.File``'s cost, which
        counts at 40,000 shards), on S3 through ``open_h5(header_only=True)``'s ranged reads."""
        if self.s3:
            with self.open_h5(header_only=True) as f:
                yield f.id
            return
        fid = h5py.h5f.open(os.fsencode(self.text), h5py.h5f.ACC_RDONLY, _read_access())
        try:
            yield fid
        finally:
            fid.close()

    def release(self) -> None:
        """Drop this process's in-memory copy of the S3 object (read once, no longer needed)."""
        _fetched.pop(self.text, None)

    # ------------------------------------------------------------------ writing
    def make_dir(self) -> None:
        """Create the directory (S3 has none to create: check the bucket can be reached)."""
        if not self.s3:
            Path(self.text).mkdir(parents=True, exist_ok=True)
            return
        with _s3_errors(self):
            _s3().head_bucket(Bucket=self.bucket)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically."""
        if self.s3:
            with _s3_errors(self):
                _s3().put_object(Bucket=self.bucket, Key=self.key, Body=data)
            _fetched.pop(self.text, None)
            return
        path = Path(self.text)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            _replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def writing_h5(self) -> Iterator[h5py.File]:
        """An HDF5 file to fill; it appears at this location only if the block succeeds."""
        if self.s3:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w", locking=False) as f:
                yield f
            self.write_bytes(buffer.getvalue())
            return
        path = Path(self.text)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                yield f
            _replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _prefix(self) -> str:
        return f"{self.key}/" if self.key else ""


class _RangedObject(io.RawIOBase):
    """A read-only, seekable S3 object read through ranged GETs of ``block`` bytes (aligned),
    the last ``kept`` of them held for reads that come back to them. Every GET names the
    ETag seen when it was opened: a replaced object fails the read instead of mixing."""

    def __init__(self, where: Location, block: int = HEADER_BLOCK, kept: int = 1) -> None:
        self._where, self._pos, self._block, self._kept = where, 0, block, max(1, kept)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        with _s3_errors(where):
            head = _s3().head_object(Bucket=where.bucket, Key=where.key)
        self._size, self._etag = head["ContentLength"], head["ETag"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), self._size - self._pos))
        done = 0
        while done < n:
            index, skip = divmod(self._pos + done, self._block)
            data = self._fetch(index)
            take = min(n - done, len(data) - skip)
            out[done : done + take] = data[skip : skip + take]
            done += take
        self._pos += done
        return done

    def _fetch(self, index: int) -> bytes:
        """Block ``index``: a kept one, or one ranged GET (the oldest kept block makes room)."""
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        first = index * self._block
        span = f"bytes={first}-{min(first + self._block, self._size) - 1}"
        where = self._where
        with _s3_errors(where):
            reply = _s3().get_object(Bucket=where.bucket, Key=where.key, Range=span, IfMatch=self._etag)
            data = reply["Body"].read()
        if len(data) != min(self._block, self._size - first):
            raise InputError(f"{where}: S3 returned {len(data)} bytes for {span} (the object changed?)")
        self._blocks[index] = data
        if len(self._blocks) > self._kept:
            self._blocks.popitem(last=False)
        return data


@cache
def _read_access() -> h5py.h5p.PropFAID:
    """File access without locks, closing every object of the file with it (as h5py does)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_file_locking(False, True)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    return fapl


def _replace_durably(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file over ``path``, its data on disk first: after a node's
    crash a renamed file whose blocks never reached the disk (NFS, Lustre, ext4 without
    ordered data) would look whole and hold zeros."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def forget() -> None:
    """Drop this process's in-memory copies of S3 objects (a warm Lambda reuses the process)."""
    _fetched.clear()


def _s3() -> Any:
    """This process's S3 client for the endpoint the environment names now (tests and the
    local emulation point one process at several S3 servers in turn)."""
    return _s3_for(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


@cache
def _s3_for(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Standard retries ride out S3's throttling replies; a short connect timeout makes an
    # unreachable endpoint an error in seconds rather than minutes.
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", config=config)


@contextmanager
def _s3_errors(where: Location, missing_ok: bool = False) -> Iterator[None]:
    """S3 failures as one-line InputErrors naming the location."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise InputError(f"{where}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/...)") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if missing_ok and code in ("404", "NoSuchKey", "NotFound"):
            raise
        if code in ("PreconditionFailed", "412"):  # a ranged read's ETag no longer matches
            raise InputError(f"{where}: the object was replaced while it was being read") from None
        message = exc.response.get("Error", {}).get("Message") or code
        raise InputError(f"{where}: S3 refused: {code}: {message}") from None
    except BotoCoreError as exc:
        raise InputError(f"{where}: S3 unreachable: {exc}") from None
