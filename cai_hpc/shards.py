"""The HDF5 shard format (DESIGN.md): writing, validating and streaming reads.

A shard holds ``images`` float32 (N, 5, 32, 32), ``magnitudes`` float32 (N, 5) and optionally
``redshift`` float32 (N,) and ``object_id`` int64 (N,). A dataset is a directory (or S3 prefix)
of shards; sorted file-name order defines the global sample index.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cai_hpc.errors import InputError
from cai_hpc.storage import Location

FORMAT = "cai-hpc-shard"
FORMAT_VERSION = 1
BANDS = 5
SIDE = 32
IMAGE_SHAPE = (BANDS, SIDE, SIDE)
SAMPLE_BYTES = 4 * (BANDS * SIDE * SIDE + BANDS + 1) + 8  # images, magnitudes, redshift, id
CHUNK_BYTES = 256 * 1024

# dataset name -> (dtype, shape after N, required)
DATASETS = {
    "images": (np.dtype(np.float32), IMAGE_SHAPE, True),
    "magnitudes": (np.dtype(np.float32), (BANDS,), True),
    "redshift": (np.dtype(np.float32), (), False),
    "object_id": (np.dtype(np.int64), (), False),
}


@dataclass(frozen=True)
class ShardInfo:
    """What validation learnt from a shard's header: enough to plan without reopening it."""

    path: Location
    rows: int
    labelled: bool
    has_object_id: bool
    version: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Columns:
    """A slab of rows read from one shard (``redshift``/``object_id`` are None when absent)."""

    images: np.ndarray
    magnitudes: np.ndarray
    redshift: np.ndarray | None
    object_id: np.ndarray | None


def rows_per_shard(shard_mb: float) -> int:
    """Rows that fit in a shard of ``shard_mb`` megabytes (10^6 bytes), at least one."""
    if shard_mb <= 0:
        raise InputError(f"--shard-mb must be positive, got {shard_mb}")
    return max(1, int(shard_mb * 1e6 // SAMPLE_BYTES))


class ShardWriter:
    """Writes one shard of a known row count slab by slab, then renames it into place.

    On an exception nothing is left behind; a reader never sees a partial shard.
    """

    def __init__(self, path: Path, rows: int, labelled: bool, has_object_id: bool, attrs: dict | None = None) -> None:
        self.path = path
        self.rows = rows
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._file = h5py.File(self._tmp, "w")
        self._file.attrs["format"] = FORMAT
        self._file.attrs["format_version"] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value
        present = {"images": True, "magnitudes": True, "redshift": labelled, "object_id": has_object_id}
        for name, (dtype, shape, _) in DATASETS.items():
            if present[name]:
                row_bytes = dtype.itemsize * int(np.prod(shape))
                chunk_rows = max(1, min(rows, CHUNK_BYTES // row_bytes))
                self._file.create_dataset(name, shape=(rows, *shape), dtype=dtype, chunks=(chunk_rows, *shape))

    def write(self, start: int, cols: Columns) -> None:
        stop = start + len(cols.images)
        for name in DATASETS:
            if name in self._file:
                self._file[name][start:stop] = getattr(cols, name)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        self._tmp.unlink(missing_ok=True)


def write_shard(path: Path, cols: Columns, attrs: dict | None = None) -> None:
    """Write a whole shard from in-memory columns (atomically)."""
    with ShardWriter(path, len(cols.images), cols.redshift is not None, cols.object_id is not None, attrs) as w:
        w.write(0, cols)


class DatasetWriter:
    """Cuts a stream of row slabs into shards of ``rows_per_shard`` rows.

    Shards are staged in a hidden directory inside ``out`` and moved into place only when
    the whole dataset was written, so a failure part-way (bad input, full disk) leaves
    ``out`` as it was.
    """

    def __init__(
        self,
        out: Path,
        total_rows: int,
        rows_per_shard: int,
        labelled: bool,
        has_object_id: bool,
        attrs: dict | None = None,
    ) -> None:
        if out.exists() and any(out.glob("*.h5")):
            raise InputError(f"{out}: already holds shards; write a dataset into an empty directory")
        self.out = out
        self._bounds = [(a, min(a + rows_per_shard, total_rows)) for a in range(0, total_rows, rows_per_shard)]
        self._width = max(5, len(str(len(self._bounds) - 1)))
        self._kind = (labelled, has_object_id, attrs)
        self._stage = out / f".staging-{os.getpid()}"
        self._made_out = not out.exists()
        self._row = 0
        self._writer: ShardWriter | None = None

    def __enter__(self) -> DatasetWriter:
        try:
            self._stage.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"{self.out}: cannot create the dataset directory: {exc.strerror}") from None
        return self

    def add(self, cols: Columns) -> None:
        """Append rows; they may straddle shard boundaries."""
        done = 0
        while done < len(cols.images):
            shard = bisect.bisect_right([a for a, _ in self._bounds], self._row) - 1
            first, last = self._bounds[shard]
            if self._writer is None:
                name = f"shard-{shard:0{self._width}d}.h5"
                self._writer = ShardWriter(self._stage / name, last - first, *self._kind)
            take = min(last - self._row, len(cols.images) - done)
            self._writer.write(self._row - first, _slice(cols, done, done + take))
            done += take
            self._row += take
            if self._row == last:
                self._writer.__exit__(None)
                self._writer = None

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._writer is not None:
            self._writer.__exit__(exc_type or RuntimeError)
        committed = False
        try:
            if exc_type is None:
                if self._row != (self._bounds[-1][1] if self._bounds else 0):
                    raise RuntimeError(f"dataset writer got {self._row} rows, expected {self._bounds[-1][1]}")
                for shard in sorted(self._stage.iterdir()):
                    os.replace(shard, self.out / shard.name)
                committed = True
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)
            # Any failure, the writer's own (rows missing, a rename refused) included, leaves out as it was.
            if not committed and self._made_out:
                shutil.rmtree(self.out, ignore_errors=True)

    @property
    def shard_count(self) -> int:
        return len(self._bounds)


def _slice(cols: Columns, a: int, b: int) -> Columns:
    def cut(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x[a:b]

    return Columns(cols.images[a:b], cols.magnitudes[a:b], cut(cols.redshift), cut(cols.object_id))


def inspect_shard(where: Location | Path | str) -> ShardInfo:
    """Validate a shard's header (format, datasets, dtypes, shapes); raise InputError if bad.

    HDF5's low-level calls, not h5py's objects: a third of the time per shard, which is what
    planning 40,000 shards costs."""
    path = Location(where)
    with ExitStack() as stack:
        try:
            fid = stack.enter_context(path.h5_header())
        except OSError as exc:
            raise InputError(f"{path}: {_open_failure(exc)}") from None
        try:
            return _checked_header(fid, path)
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as exc:  # a damaged header or index
            raise InputError(f"{path}: not a readable HDF5 shard (damaged?): {_short(exc)}") from None


def _checked_header(fid: h5py.h5f.FileID, path: Location) -> ShardInfo:
    fmt = _attribute(fid, "format")
    if fmt is None and fid.links.exists(b"images") and fid.links.exists(b"magnitudes"):
        raise InputError(
            f"{path}: HDF5 arrays without the {FORMAT} format attributes; "
            f"make shards of them with: cai-hpc convert {path.name} --out DIR"
        )
    if fmt != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} file (attribute 'format' is {fmt!r})")
    version = _attribute(fid, "format_version")
    version = version if isinstance(version, int) else -1
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: shard format version {version}, this cai-hpc reads {FORMAT_VERSION}")
    rows = None
    present = set()
    for name, (dtype, shape, required) in DATASETS.items():
        if not fid.links.exists(name.encode()):
            if required:
                raise InputError(f"{path}: missing dataset '{name}'")
            continue
        present.add(name)
        try:
            ds = h5py.h5d.open(fid, name.encode())
        except (KeyError, ValueError, OSError):
            raise InputError(f"{path}: '{name}' is not a dataset") from None
        if ds.get_type() != _H5_TYPES[name]:
            raise InputError(f"{path}: dataset '{name}' has dtype {ds.dtype}, expected {dtype}")
        found = ds.shape  # each call asks HDF5 again
        if found[1:] != shape or len(found) != 1 + len(shape):
            expected = "(N" + "".join(f", {d}" for d in shape) + ")"
            raise InputError(f"{path}: dataset '{name}' has shape {found}, expected {expected}")
        if rows is None:
            rows = found[0]
        elif found[0] != rows:
            raise InputError(f"{path}: dataset '{name}' has {found[0]} rows, 'images' has {rows}")
    if not rows:
        raise InputError(f"{path}: empty shard (0 rows)")
    return ShardInfo(path, rows, "redshift" in present, "object_id" in present, version)


# The HDF5 type each dataset must have: DATASETS' numpy dtypes, little-endian as numpy's here.
_H5_TYPES = {"images": h5py.h5t.IEEE_F32LE, "magnitudes": h5py.h5t.IEEE_F32LE, "redshift": h5py.h5t.IEEE_F32LE}
_H5_TYPES["object_id"] = h5py.h5t.STD_I64LE


def _attribute(fid: h5py.h5f.FileID, name: str) -> object:
    """A scalar file attribute as a Python value (strings decoded), None when absent or not a
    scalar."""
    try:
        attr = h5py.h5a.open(fid, name.encode())
    except KeyError:
        return None
    if attr.shape != ():
        return None
    value = np.empty((), attr.dtype)
    attr.read(value)
    item = value.item()
    return item.decode(errors="replace") if isinstance(item, bytes) else item


def _open_failure(exc: OSError) -> str:
    """Why HDF5 could not open a file: a lock the filesystem refused is said to be one, never
    taken for a damaged file."""
    if _LOCK_FAILURE.search(str(exc)):
        forced = os.environ.get("HDF5_USE_FILE_LOCKING")
        hint = f"; HDF5_USE_FILE_LOCKING={forced} asks for locks that cai-hpc does not need: unset it" if forced else ""
        return f"cannot open: the filesystem refused a file lock ({_short(exc)}){hint}"
    return f"not a readable HDF5 file (truncated or corrupt?): {_short(exc)}"


_LOCK_FAILURE = re.compile(r"unable to (un)?lock file", re.IGNORECASE)


def list_shards(where: Location | Path | str) -> list[Location]:
    """The shards of a dataset directory or S3 prefix, in the sorted order that defines the
    global index."""
    data = Location(where)
    if not data.is_dir():
        raise InputError(f"{data}: no such dataset directory")
    paths = data.list(".h5")
    if not paths:
        raise InputError(f"{data}: no .h5 shards in this directory")
    return paths


def scan_dataset(data: Location | Path | str) -> list[ShardInfo]:
    """Validate every shard header of a dataset directory or S3 prefix."""
    return [inspect_shard(p) for p in list_shards(data)]


class ShardReader:
    """Reads row slabs of one shard and checks them, naming the file and rows in every error."""

    def __init__(self, info: ShardInfo, part: bool = False) -> None:
        """``part``: only some rows will be read (on S3, only their byte ranges are fetched)."""
        self.info = info
        try:
            self._file = info.path.open_h5(part=part)
        except OSError as exc:
            raise InputError(f"{info.path}: {_open_failure(exc)}") from None
        # Opened once: a dataset's chunk cache lives as long as the open dataset, so a chunk
        # that straddles two reads is read from the file once, not once per read.
        self._columns = {name: self._file[name] for name in DATASETS if name in self._file}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def read(self, start: int, stop: int, images: bool = True) -> Columns:
        """Rows ``start:stop``; raise InputError on a read failure or a non-finite value."""
        f, path = self._columns, self.info.path
        try:
            cols = Columns(
                images=f["images"][start:stop] if images else np.empty((0, *IMAGE_SHAPE), np.float32),
                magnitudes=f["magnitudes"][start:stop],
                redshift=f["redshift"][start:stop] if self.info.labelled else None,
                object_id=f["object_id"][start:stop] if self.info.has_object_id else None,
            )
        except (OSError, KeyError) as exc:
            raise InputError(
                f"{path}: cannot read rows {start}:{stop} (truncated or corrupt?): {_short(exc)}"
            ) from None
        for name in ("images", "magnitudes", "redshift"):
            values = getattr(cols, name)
            if values is not None and not np.isfinite(values).all():
                bad = start + int(np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0][0])
                raise InputError(f"{path}: dataset '{name}' holds NaN or inf (first at row {bad})")
        return cols


def _short(exc: BaseException) -> str:
    """The first line of an exception's message: h5py's can run to several."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
