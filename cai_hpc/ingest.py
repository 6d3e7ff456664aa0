"""``cai-hpc convert``: the reference's ``.pt`` TensorDatasets to HDF5 shards.

A source holds (images, magnitudes, redshift) tensors: images float32 (N, 5, 32, 32), or
(N, 64, 64, 5) channels-last, which are centre-cropped to 32x32 and moved to channels-first;
magnitudes (N, 5), float64 in the reference, stored as float32; redshift (N,) or (N, 1).
Sources are memory-mapped and streamed slab by slab, so memory stays flat.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

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


def convert(sources: list[Path], out: Path, shard_mb: float) -> int:
    """Write the rows of ``sources``, in order, as shards in ``out``; returns the shard count."""
    loaded = [(path, *load_source(path)) for path in sources]
    total = sum(len(images) for _, images, _, _ in loaded)
    attrs = {"source": "cai-hpc convert: " + ", ".join(p.name for p in sources)}
    with DatasetWriter(out, total, rows_per_shard(shard_mb), labelled=True, has_object_id=False, attrs=attrs) as writer:
        for path, images, mags, z in loaded:
            for a in range(0, len(images), SLAB):
                b = min(a + SLAB, len(images))
                writer.add(to_columns(path, images[a:b], mags[a:b], z[a:b], a))
        return writer.shard_count
