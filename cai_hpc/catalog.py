"""``cai-hpc catalog RUN --to FILE``: a run's predictions as one table, in FITS, Parquet or CSV.

Columns: ``object_id`` (when the shards carry ids), ``redshift_pred``, ``redshift`` (when the
shards are labelled; NaN for the rows of unlabelled shards if only some are), ``shard`` (the
input shard's file name) and ``row`` (the row within it). The run's metadata (checkpoint,
weights digest, precision, cai-hpc version, date) goes into the FITS header, the Parquet
key-value metadata, or the CSV's ``#`` comment lines.

The table is streamed: a first pass reads only the files' headers (row counts, columns,
weights); the second reads one shard's predictions at a time and appends them (a Parquet row
group per shard; the FITS header is written with the row count the first pass found, then the
rows, then the padding). Memory stays flat in the catalogue's size. The file appears only
once complete (a temporary name, renamed).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import cai_hpc
from cai_hpc import predictions
from cai_hpc.errors import InputError
from cai_hpc.storage import Location

FITS_BLOCK = 2880
FITS_VALUE_WITH_COMMENT = 30  # characters of a string value that leave room for the comment
FORMATS = {".fits": "fits", ".fit": "fits", ".parquet": "parquet", ".csv": "csv"}
# name -> (description, IVOA UCD); redshifts are dimensionless, so no column has a unit.
DESCRIPTIONS = {
    "object_id": ("survey object id (input shard)", "meta.id;meta.main"),
    "redshift_pred": ("redshift predicted by AstroMAE", "src.redshift.phot"),
    "redshift": ("true redshift (input shard)", "src.redshift"),
    "shard": ("input shard file name", "meta.file"),
    "row": ("row within the shard, from 0", "meta.record"),
}
# metadata key -> (FITS keyword, comment)
KEYWORDS = {
    "checkpoint": ("CHECKPT", "weights the predictions were made with"),
    "weights": ("WEIGHTS", "weights digest / precision"),
    "precision": ("PRECISN", "arithmetic of the image branches"),
    "cai_hpc_version": ("CAIHPCV", "cai-hpc version that ran the inference"),
    "date": ("DATE", "UTC date this catalogue was written"),
    "run": ("RUN", "the run directory or S3 prefix"),
}


@dataclass(frozen=True)
class Part:
    """One prediction file, as the header pass found it."""

    where: Location
    rows: int
    labelled: bool
    has_object_id: bool


def write_catalog(run: Location | Path | str, to: Path) -> int:
    """Write the catalogue of ``run`` to ``to`` (format from its suffix); returns its rows."""
    kind = FORMATS.get(to.suffix.lower())
    if kind is None:
        raise InputError(f"{to}: unknown catalogue format (use .fits, .parquet or .csv)")
    if not to.parent.is_dir():
        raise InputError(f"{to.parent}: no such directory")
    parts, meta = survey(Location(run))
    columns = _columns(parts)
    tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")
    try:
        {"fits": _write_fits, "parquet": _write_parquet, "csv": _write_csv}[kind](tmp, parts, columns, meta)
        os.replace(tmp, to)
    finally:
        tmp.unlink(missing_ok=True)
    return sum(p.rows for p in parts)


def survey(run: Location) -> tuple[list[Part], dict[str, str]]:
    """The header pass: every prediction file's rows and columns, and the run's metadata.

    A catalogue mixing predictions of different weights or precisions is refused."""
    parts, stamp = [], None
    for where in predictions.prediction_files(run):
        try:
            with where.open_h5(header_only=True) as f:
                if f.attrs.get("format") != predictions.FORMAT or "redshift_pred" not in f:
                    raise InputError(f"{where}: not a cai-hpc predictions file")
                rows = f["redshift_pred"].shape[0]
                part = Part(where, rows, "redshift" in f, "object_id" in f)
                mine = (str(f.attrs.get("checkpoint", "")), str(f.attrs.get("weights", "")))
        except (OSError, KeyError) as exc:
            raise InputError(f"{where}: not a readable predictions file: {str(exc).splitlines()[0]}") from None
        if stamp is None:
            stamp, first = mine, where
        elif mine != stamp:
            raise InputError(f"{where}: made with weights {mine[1]!r}, but {first.name} with {stamp[1]!r}")
        parts.append(part)
    checkpoint, weights = stamp or ("", "")
    meta = {
        "checkpoint": checkpoint,
        "weights": weights,
        "precision": weights.rpartition("/")[2],
        "cai_hpc_version": _run_version(run),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "run": str(run),
    }
    return parts, meta


def _run_version(run: Location) -> str:
    """The cai-hpc version of the run (its summary.json), else this one's."""
    summary = run / "summary.json"
    try:
        if summary.exists():
            return str(json.loads(summary.read_bytes())["versions"]["cai_hpc"])
    except (ValueError, KeyError, TypeError):
        pass
    return cai_hpc.__version__


def _columns(parts: list[Part]) -> dict[str, np.dtype]:
    """The table's columns and their (big-endian, as FITS stores them) dtypes."""
    width = max(len(p.where.name) for p in parts)
    columns = {}
    if all(p.has_object_id for p in parts):
        columns["object_id"] = np.dtype(">i8")
    columns["redshift_pred"] = np.dtype(">f4")
    if any(p.labelled for p in parts):
        columns["redshift"] = np.dtype(">f4")
    columns["shard"] = np.dtype(f"S{width}")
    columns["row"] = np.dtype(">i8")
    return columns


def _chunks(parts: list[Part], columns: dict[str, np.dtype]) -> Iterator[np.ndarray]:
    """The rows of one prediction file at a time, as a record array of ``columns``."""
    dtype = np.dtype(list(columns.items()))
    for part in parts:
        # Ranged reads on S3 (nothing of the file is kept once it is closed); h5py on disk.
        with part.where.open_h5(header_only=True) as f:
            try:
                chunk = np.empty(part.rows, dtype)
                chunk["redshift_pred"] = f["redshift_pred"][:]
                if "object_id" in columns:
                    chunk["object_id"] = f["object_id"][: part.rows]
                if "redshift" in columns:
                    chunk["redshift"] = f["redshift"][: part.rows] if part.labelled else np.nan
            except (OSError, KeyError, ValueError) as exc:
                raise InputError(f"{part.where}: cannot read: {str(exc).splitlines()[0]}") from None
        chunk["shard"] = part.where.name
        chunk["row"] = np.arange(part.rows)
        yield chunk


def _write_fits(tmp: Path, parts: list[Part], columns: dict[str, np.dtype], meta: dict[str, str]) -> None:
    """A primary HDU and one BINTABLE, written by hand around astropy's headers: the table
    header already holds the final row count (NAXIS2), so the rows can follow it shard by shard."""
    from astropy.io import fits

    total = sum(p.rows for p in parts)
    codes = {"i8": "K", "f4": "E"}
    cols = [fits.Column(name=name, format=codes.get(dt.str[1:], f"{dt.itemsize}A")) for name, dt in columns.items()]
    table = fits.BinTableHDU.from_columns(cols, nrows=0, name="CATALOG")
    header = table.header
    header["NAXIS2"] = total
    for i, name in enumerate(columns, 1):
        description, ucd = DESCRIPTIONS[name]
        header.comments[f"TTYPE{i}"] = description
        header.insert(f"TFORM{i}", (f"TUCD{i}", ucd, "IVOA UCD1+"), after=True)
    for key, value in meta.items():
        keyword, comment = KEYWORDS[key]
        # A long value (a checkpoint's name, an S3 prefix) continues on CONTINUE cards and
        # leaves no room for a comment.
        header[keyword] = (value, comment) if len(value) <= FITS_VALUE_WITH_COMMENT else value
    header["ORIGIN"] = ("cai-hpc", "catalogue written by cai-hpc catalog")
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "cai-hpc"
    primary.header["DATE"] = (meta["date"], KEYWORDS["date"][1])
    with tmp.open("wb") as f:
        f.write(primary.header.tostring().encode("ascii"))
        f.write(header.tostring().encode("ascii"))
        written = 0
        for chunk in _chunks(parts, columns):
            f.write(chunk.tobytes())
            written += chunk.nbytes
        f.write(b"\0" * (-written % FITS_BLOCK))


def _write_parquet(tmp: Path, parts: list[Part], columns: dict[str, np.dtype], meta: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"object_id": pa.int64(), "redshift_pred": pa.float32(), "redshift": pa.float32()}
    types |= {"shard": pa.string(), "row": pa.int64()}
    fields = [
        pa.field(name, types[name], metadata={"description": DESCRIPTIONS[name][0], "ucd": DESCRIPTIONS[name][1]})
        for name in columns
    ]
    schema = pa.schema(fields, metadata={f"cai_hpc.{k}": v for k, v in meta.items()})
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in _chunks(parts, columns):
            arrays = [
                pa.array(
                    np.char.decode(chunk[n]) if n == "shard" else chunk[n].astype(chunk[n].dtype.newbyteorder("="))
                )
                for n in columns
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))  # one row group per shard


def _write_csv(tmp: Path, parts: list[Part], columns: dict[str, np.dtype], meta: dict[str, str]) -> None:
    with tmp.open("w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        for name in columns:
            f.write(f"# column {name}: {DESCRIPTIONS[name][0]}\n")
        out = csv.writer(f)
        out.writerow(columns)
        for chunk in _chunks(parts, columns):
            _csv_rows(out, chunk, columns)


def _csv_rows(out: Any, chunk: np.ndarray, columns: dict[str, np.dtype]) -> None:
    # str() of a numpy float32 is its shortest exact form: the CSV reads back bit for bit.
    cells = [
        np.char.decode(chunk[n]) if n == "shard" else [str(v) for v in chunk[n]] if n.startswith("redshift") else
        chunk[n].tolist()
        for n in columns
    ]  # fmt: skip
    out.writerows(zip(*cells, strict=True))
