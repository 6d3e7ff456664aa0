"""Per-shard prediction files: ``OUT/predictions/<shard stem>.h5``, written atomically
(a renamed temporary file on disk, a single PUT on S3).

A file holds ``redshift_pred`` float32 (N,), ``object_id`` and ``redshift`` copied from the
shard when present, and with ``infer --embeddings`` also ``embeddings`` float32 (N, D): each
sample's joint feature vector, the input of the regression head (D = 3216 for AstroMAE).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cai_hpc.errors import InputError
from cai_hpc.shards import ShardInfo
from cai_hpc.storage import Location

FORMAT = "cai-hpc-predictions"
FORMAT_VERSION = 1
CARRIED = ("object_id", "redshift")  # columns copied from the shard, when it has them


def prediction_path(out: Location, shard: ShardInfo) -> Location:
    return out / "predictions" / f"{shard.path.stem}.h5"


def prediction_files(out: Location | Path | str) -> list[Location]:
    """The prediction files of a run directory or S3 prefix, in shard order."""
    where = Location(out) / "predictions"
    files = where.list(".h5") if where.is_dir() else []
    if not files:
        raise InputError(f"{out}: no predictions/*.h5 files (run 'cai-hpc infer --out {out}' first)")
    return files


def write_predictions(
    out: Location,
    shard: ShardInfo,
    pred: np.ndarray,
    stamp: dict[str, str],
    carried: dict[str, np.ndarray],
    embeddings: np.ndarray | None = None,
) -> Location:
    """Write ``pred`` (the shard's first ``len(pred)`` rows) with the same rows of the shard's
    ids and labels (``carried``: ``object_id``/``redshift``, those the shard has, handed over
    by the reader so the input is read only once), stamped with the weights that made them
    (``checkpoint`` label and ``weights`` id), and the rows' joint feature vectors when given.

    The file appears only once complete, so a crash never leaves a file that looks whole; and
    its ``rows`` attribute, which ``is_complete`` requires, is written last.
    """
    rows = len(pred)
    path = prediction_path(out, shard)
    with path.writing_h5() as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["source"] = shard.name
        f.attrs["source_rows"] = shard.rows
        for key, value in stamp.items():
            f.attrs[key] = value
        f.create_dataset("redshift_pred", data=pred.astype(np.float32, copy=False))
        if embeddings is not None:
            f.create_dataset("embeddings", data=embeddings.astype(np.float32, copy=False))
        for name, values in carried.items():
            f.create_dataset(name, data=values)
        f.attrs["rows"] = rows
    return path


def is_complete(out: Location, shard: ShardInfo, rows: int, weights: str, embeddings: bool = False) -> bool:
    """True when the shard's predictions file is readable, was made from this shard with
    these weights, holds at least its first ``rows`` rows, and their embeddings if asked.

    "From this shard" is its name and length, and the ids and labels the file copied from it
    equal the shard's own: a dataset made again under the same names (another seed, another
    survey) is predicted again, never taken for finished."""
    path = prediction_path(out, shard)
    if not path.exists():
        return False
    try:
        with path.open_h5(header_only=True) as f:
            held = int(f.attrs.get("rows", -1))
            return (
                f.attrs.get("format") == FORMAT
                and f.attrs.get("source") == shard.name
                and int(f.attrs.get("source_rows", -1)) == shard.rows
                and f.attrs.get("weights") == weights
                and held >= rows
                and f["redshift_pred"].shape == (held,)
                and (not embeddings or ("embeddings" in f and f["embeddings"].shape[0] == held))
                and _copied_from(f, shard, held)
            )
    except (OSError, KeyError, ValueError):
        return False


def _copied_from(f: h5py.File, shard: ShardInfo, rows: int) -> bool:
    """The file's ``object_id`` and ``redshift`` are the shard's first ``rows`` (a small read of
    two columns, only for files that passed every other check)."""
    names = [name for name, has in (("object_id", shard.has_object_id), ("redshift", shard.labelled)) if has]
    if sorted(names) != sorted(name for name in CARRIED if name in f):
        return False
    if not names:
        return True
    with shard.path.open_h5(header_only=True) as src:
        return all(np.array_equal(f[name][:rows], src[name][:rows]) for name in names)


def read_labelled(out: Location, shard: ShardInfo, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) redshift of the first ``rows`` rows of a finished shard; empty when it
    has no labels."""
    # Ranged reads of two small datasets: the whole file (embeddings too) would stay in memory on S3.
    with prediction_path(out, shard).open_h5(header_only=True) as f:
        if "redshift" not in f:
            return np.empty(0, np.float32), np.empty(0, np.float32)
        return f["redshift_pred"][:rows], f["redshift"][:rows]


def remove_stale_temporaries(out: Location) -> None:
    """Temporary files of a run that was killed mid-write (they are never taken for results);
    S3 has none, a PUT is all or nothing."""
    if not out.s3:
        for tmp in (Path(out) / "predictions").glob(".*.h5.tmp-*"):
            tmp.unlink(missing_ok=True)
