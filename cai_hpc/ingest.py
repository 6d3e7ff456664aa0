"""``cai-hpc convert``: inputs people have, to HDF5 shards.

* The reference's ``.pt`` TensorDatasets (one or more, concatenated): (images, magnitudes,
  redshift) tensors: images float32 (N, 5, 32, 32), or (N, 64, 64, 5) channels-last, which
  are centre-cropped to 32x32 and moved to channels-first; magnitudes (N, 5), float64 in the
  reference, stored as float32; redshift (N,) or (N, 1).
* Image arrays (one source): a FITS cutout cube (the first HDU, primary or image extension,
  holding an (N, 5, S, S) array), or five FITS files of (N, S, S), one per band, given in
  u, g, r, i, z order; a numpy ``.npy`` array (N, 5, S, S); or a ``.npz`` or plain HDF5 file
  holding ``images`` (and optionally ``magnitudes``, ``redshift``, ``object_id``). Cutouts
  larger than 32x32 are centre-cropped. Magnitudes, and optionally redshift and object id,
  come from ``--table`` (FITS or CSV, one row per image, columns named by options) unless
  the ``.npz``/HDF5 holds them.

Sources are memory-mapped (``.pt``, ``.npy``, FITS, HDF5; a ``.npz`` member is read whole)
and streamed slab by slab, so memory stays flat in the image count. A bad input stops the
conversion with one line and leaves the output directory as it was.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cai_hpc.errors import InputError
from cai_hpc.shards import BANDS, SIDE, Columns, DatasetWriter, rows_per_shard

SLAB = 4096


def load_source(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (images, magnitudes, redshift) tensors of a reference ``.pt`` file, shape-checked."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a torch.save archive (truncated or not a .pt file?)")
    try:
        with torch.serialization.safe_globals([TensorDataset]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: cannot load: {str(exc).splitlines()[0]}") from None
    tensors = obj.tensors if isinstance(obj, TensorDataset) else obj
    if (
        not isinstance(tensors, (tuple, list))
        or len(tensors) != 3
        or not all(isinstance(t, torch.Tensor) for t in tensors)
    ):
        raise InputError(f"{path}: expected a TensorDataset of (images, magnitudes, redshift)")
    images, mags, z = tensors
    n = len(images)
    if images.shape[1:] not in ((BANDS, SIDE, SIDE), (64, 64, BANDS)):
        raise InputError(f"{path}: images have shape {tuple(images.shape)}, expected (N, 5, 32, 32) or (N, 64, 64, 5)")
    if mags.shape != (n, BANDS):
        raise InputError(f"{path}: magnitudes have shape {tuple(mags.shape)}, expected ({n}, 5)")
    if z.shape not in ((n,), (n, 1)):
        raise InputError(f"{path}: redshift has shape {tuple(z.shape)}, expected ({n},)")
    if n == 0:
        raise InputError(f"{path}: empty dataset (0 rows)")
    for name, t in (("images", images), ("magnitudes", mags), ("redshift", z)):
        if not t.is_floating_point():
            raise InputError(f"{path}: {name} has dtype {t.dtype}, expected a floating-point type")
    return images, mags, z.reshape(n)


def to_columns(path: Path, images: torch.Tensor, mags: torch.Tensor, z: torch.Tensor, start: int) -> Columns:
    """Rows of one slab in shard layout, with NaN/inf refused (naming file and row)."""
    img = images.numpy()
    if img.shape[1:] == (64, 64, BANDS):
        lo = (64 - SIDE) // 2
        img = img[:, lo : lo + SIDE, lo : lo + SIDE, :].transpose(0, 3, 1, 2)
    cols = Columns(
        images=np.ascontiguousarray(img, dtype=np.float32),
        magnitudes=mags.numpy().astype(np.float32),
        redshift=z.numpy().astype(np.float32),
        object_id=None,
    )
    for name in ("images", "magnitudes", "redshift"):
        values = getattr(cols, name).reshape(len(cols.images), -1)
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            raise InputError(f"{path}: {name} holds NaN or inf (first at row {start + int(np.argmin(finite))})")
    return cols


@dataclass
class TableColumns:
    """Where magnitudes (u, g, r, i, z), redshift and object id are found in ``--table``."""

    table: Path | None = None
    magnitudes: list[str] = field(default_factory=lambda: ["mag_u", "mag_g", "mag_r", "mag_i", "mag_z"])
    redshift: str | None = None
    object_id: str | None = None


@dataclass
class Arrays:
    """An image source and its per-row columns: ``images(a, b)`` reads rows a:b."""

    name: str
    rows: int
    images: Callable[[int, int], np.ndarray]
    magnitudes: np.ndarray
    redshift: np.ndarray | None
    object_id: np.ndarray | None


PT_SUFFIXES = (".pt", ".pth")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
ARRAY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")


def convert(sources: list[Path], out: Path, shard_mb: float, columns: TableColumns | None = None) -> int:
    """Write the rows of ``sources``, in order, as shards in ``out``; returns the shard count."""
    columns = columns or TableColumns()
    for path in sources:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
    if all(p.name.lower().endswith(PT_SUFFIXES) for p in sources):
        if columns.table is not None:
            raise InputError("--table is for image arrays (FITS, .npy, .npz, HDF5); a .pt source holds its columns")
        return _convert_pt(sources, out, shard_mb)
    rows = rows_per_shard(shard_mb)
    with ExitStack() as stack:
        arrays = _load_arrays(sources, columns, stack)
        attrs = {"source": "cai-hpc convert: " + ", ".join(p.name for p in sources)}
        labelled, has_id = arrays.redshift is not None, arrays.object_id is not None
        with DatasetWriter(out, arrays.rows, rows, labelled=labelled, has_object_id=has_id, attrs=attrs) as writer:
            for a in range(0, arrays.rows, SLAB):
                b = min(a + SLAB, arrays.rows)
                writer.add(_slab(arrays, a, b))
            return writer.shard_count


def _convert_pt(sources: list[Path], out: Path, shard_mb: float) -> int:
    loaded = [(path, *load_source(path)) for path in sources]
    total = sum(len(images) for _, images, _, _ in loaded)
    attrs = {"source": "cai-hpc convert: " + ", ".join(p.name for p in sources)}
    with DatasetWriter(out, total, rows_per_shard(shard_mb), labelled=True, has_object_id=False, attrs=attrs) as writer:
        for path, images, mags, z in loaded:
            for a in range(0, len(images), SLAB):
                b = min(a + SLAB, len(images))
                writer.add(to_columns(path, images[a:b], mags[a:b], z[a:b], a))
        return writer.shard_count


def _load_arrays(sources: list[Path], columns: TableColumns, stack: ExitStack) -> Arrays:
    """The one image source (or five per-band FITS files) with its columns, shape-checked."""
    names = [p.name.lower() for p in sources]
    if all(n.endswith(FITS_SUFFIXES) for n in names):
        images, rows, found = _fits_images(sources, stack)
    elif len(sources) == 1 and names[0].endswith(ARRAY_SUFFIXES):
        images, rows, found = _array_images(sources[0], stack)
    else:
        raise InputError(
            "convert takes .pt files, or one image source: a FITS cube, five per-band FITS files, "
            f"a .npy, .npz or HDF5 file (got {', '.join(p.name for p in sources)})"
        )
    name = sources[0].name if len(sources) == 1 else f"{sources[0].name} (and {len(sources) - 1} per-band files)"
    if rows == 0:
        raise InputError(f"{name}: empty (0 images)")
    if columns.table is not None:
        found = _table_columns(columns, rows)
    elif "magnitudes" not in found:
        raise InputError(f"{name}: holds no magnitudes: give them with --table FILE (FITS or CSV)")
    mags = np.asarray(found["magnitudes"])
    if mags.shape != (rows, BANDS):
        raise InputError(f"{name}: magnitudes have shape {mags.shape}, expected ({rows}, 5)")
    z = found.get("redshift")
    if z is not None:
        z = np.asarray(z)
        if z.shape not in ((rows,), (rows, 1)):
            raise InputError(f"{name}: redshift has shape {z.shape}, expected ({rows},)")
    ids = found.get("object_id")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (rows,) or ids.dtype.kind not in "iu":
            raise InputError(f"{name}: object_id must be {rows} integers, got {ids.dtype} of shape {ids.shape}")
    for label, values in (("magnitudes", mags), ("redshift", z)):
        if values is not None:
            if values.dtype.kind not in "fiu":
                raise InputError(f"{name}: {label} has dtype {values.dtype}, expected numbers")
            finite = np.isfinite(values.reshape(rows, -1)).all(axis=1)
            if not finite.all():
                raise InputError(f"{name}: {label} holds NaN, inf or blanks (first at row {int(np.argmin(finite))})")
    return Arrays(
        name,
        rows,
        images,
        mags.astype(np.float32),
        None if z is None else z.reshape(rows).astype(np.float32),
        None if ids is None else ids.astype(np.int64),
    )


def _cube_check(name: str, shape: tuple[int, ...], expected: str) -> int:
    """The side of square cutouts at least 32 pixels wide, or an InputError."""
    side = shape[-1]
    if shape[-2] != side or side < SIDE:
        raise InputError(f"{name}: images have shape {shape}, expected {expected} with S >= {SIDE}")
    return side


def _crop(images: np.ndarray) -> np.ndarray:
    lo = (images.shape[-1] - SIDE) // 2
    return images[..., lo : lo + SIDE, lo : lo + SIDE]


def _fits_images(sources: list[Path], stack: ExitStack) -> tuple[Callable[[int, int], np.ndarray], int, dict]:
    from astropy.io import fits

    data = []
    for path in sources:
        try:
            hdus = stack.enter_context(fits.open(path, memmap=True))
            array = next((h.data for h in hdus if h.is_image and h.data is not None), None)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a readable FITS file: {str(exc).splitlines()[0]}") from None
        if array is None:
            raise InputError(f"{path}: no image HDU with data")
        data.append(array)
    if len(data) == 1:
        (cube,) = data
        if cube.ndim != 4 or cube.shape[1] != BANDS:
            raise InputError(f"{sources[0]}: images have shape {cube.shape}, expected (N, 5, S, S)")
        _cube_check(sources[0].name, cube.shape, "(N, 5, S, S)")
        return lambda a, b: _crop(cube[a:b]), len(cube), {}
    if len(data) != BANDS or any(d.ndim != 3 for d in data):
        raise InputError(f"per-band FITS input needs five files of (N, S, S) in u, g, r, i, z order, got {len(data)}")
    for path, band in zip(sources, data, strict=True):
        _cube_check(path.name, band.shape, "(N, S, S)")
        if band.shape != data[0].shape:
            raise InputError(f"{path}: shape {band.shape}, but {sources[0].name} has {data[0].shape}")
    return lambda a, b: _crop(np.stack([band[a:b] for band in data], axis=1)), len(data[0]), {}


def _array_images(path: Path, stack: ExitStack) -> tuple[Callable[[int, int], np.ndarray], int, dict]:
    suffix = path.suffix.lower()
    found: dict[str, Any] = {}
    try:
        if suffix == ".npy":
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            members = stack.enter_context(np.load(path, allow_pickle=False))
            found = {k: members[k] for k in ("magnitudes", "redshift", "object_id") if k in members.files}
            if "images" not in members.files:
                raise InputError(f"{path}: no 'images' array (holds {', '.join(members.files) or 'nothing'})")
            images = members["images"]
        else:
            import h5py

            f = stack.enter_context(h5py.File(path, "r", locking=False))
            if not isinstance(f.get("images"), h5py.Dataset):
                raise InputError(f"{path}: no 'images' dataset")
            found = {k: f[k][:] for k in ("magnitudes", "redshift", "object_id") if isinstance(f.get(k), h5py.Dataset)}
            images = f["images"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read: {str(exc).splitlines()[0]}") from None
    if len(images.shape) != 4 or images.shape[1] != BANDS:
        raise InputError(f"{path}: images have shape {tuple(images.shape)}, expected (N, 5, S, S)")
    _cube_check(path.name, tuple(images.shape), "(N, 5, S, S)")
    return lambda a, b: _crop(images[a:b]), images.shape[0], found


def _table_columns(columns: TableColumns, rows: int) -> dict[str, np.ndarray]:
    """Magnitudes, redshift and object id from a FITS or CSV table of ``rows`` rows."""
    from astropy.table import Table

    path = columns.table
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        fmt = "ascii.csv" if path.suffix.lower() == ".csv" else None
        table = Table.read(path, format=fmt)
    except Exception as exc:  # noqa: BLE001 - astropy raises many kinds for a bad table
        raise InputError(f"{path}: not a readable FITS or CSV table: {str(exc).splitlines()[0]}") from None
    if len(table) != rows:
        raise InputError(f"{path}: {len(table)} rows, but the images are {rows}")
    wanted = [*columns.magnitudes, columns.redshift, columns.object_id]
    missing = [c for c in wanted if c is not None and c not in table.colnames]
    if missing:
        raise InputError(f"{path}: no column {', '.join(missing)} (it has {', '.join(table.colnames[:12])})")

    def column(name: str) -> np.ndarray:
        values = table[name]
        if getattr(values, "mask", None) is not None and np.any(values.mask):
            row = int(np.argmax(values.mask))
            raise InputError(f"{path}: column {name} is blank at row {row}")
        return np.asarray(values)

    found = {"magnitudes": np.stack([column(c) for c in columns.magnitudes], axis=1)}
    if columns.redshift is not None:
        found["redshift"] = column(columns.redshift)
    if columns.object_id is not None:
        found["object_id"] = column(columns.object_id)
    return found


def _slab(arrays: Arrays, a: int, b: int) -> Columns:
    """Rows a:b in shard layout; NaN/inf in the images refused, naming the source and row."""
    try:
        images = np.ascontiguousarray(arrays.images(a, b), dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"{arrays.name}: cannot read images {a}:{b}: {str(exc).splitlines()[0]}") from None
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if not finite.all():
        raise InputError(f"{arrays.name}: images hold NaN or inf (first at row {a + int(np.argmin(finite))})")

    def cut(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x[a:b]

    return Columns(images, arrays.magnitudes[a:b], cut(arrays.redshift), cut(arrays.object_id))
