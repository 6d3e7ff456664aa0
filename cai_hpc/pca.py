"""``cai-hpc pca RUN --components K``: principal components of a run's embeddings, across ranks.

The embeddings (``infer --embeddings``) of every prediction file are the rows of a matrix X
(samples x D features). Each rank takes every size-th file and streams them one at a time,
three passes, through the same communicator as ``infer`` (alone, mpi4py, lambda_shim's
TcpComm):

1. the column sums and the row count, summed with ``Allreduce``: the mean;
2. the centred scatter matrix (X - mean)ᵀ(X - mean), accumulated in float64 and summed to
   rank 0 with ``Reduce``, in row blocks of a few MB (no message grows with D² at once);
   rank 0 takes its eigendecomposition and broadcasts the top K eigenvectors;
3. every sample's projection on them, written per shard like the predictions.

So the result is numpy's SVD of the whole centred matrix (the components are its right
singular vectors, the explained variances its squared singular values over n - 1), while
memory per rank is D² floats whatever the sample count. Signs are fixed by one rule: in every
component the entry of largest magnitude is positive (the first such entry on a tie).

Outputs, in ``OUT`` (default ``RUN/pca``), each written atomically: ``components.h5``
(``mean`` (D,), ``components`` (K, D), ``explained_variance``, ``explained_variance_ratio``
and ``singular_values`` (K,), attribute ``samples``) and ``projections/<shard stem>.h5``
(``projection`` float32 (N, K), ``object_id`` when the predictions have it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cai_hpc import predictions
from cai_hpc.agree import agreed
from cai_hpc.errors import InputError
from cai_hpc.storage import Location

FORMAT = "cai-hpc-pca"
BLOCK_BYTES = 8 << 20  # rows of the scatter matrix per Reduce


def pca(comm: Any, run: Location | str, out: Location | str, components: int) -> dict[str, Any] | None:
    """Compute and write the PCA of ``run``'s embeddings; returns a summary on rank 0."""
    run, out = Location(run), Location(out)
    rank, size = comm.Get_rank(), comm.Get_size()
    if components < 1:
        raise InputError(f"--components must be at least 1, got {components}", agreed=True)
    mine = agreed(comm, lambda: [_check(f) for f in predictions.prediction_files(run)[rank::size]])
    widths = {d for theirs in comm.allgather([d for _, _, d in mine]) for d in theirs}
    if len(widths) > 1:
        raise InputError(f"{run}: embeddings of different widths {sorted(widths)}", agreed=True)
    (width,) = widths or {0}

    # 1: the mean.
    sums = np.zeros(width + 1)
    for where, _, _ in mine:
        x = _embeddings(where)
        sums[:width] += x.sum(axis=0)
        sums[width] += len(x)
    total = np.empty_like(sums)
    comm.Allreduce(sums, total)
    samples = int(total[width])
    if components > min(samples, width):
        raise InputError(
            f"--components {components}: at most min(samples, features) = {min(samples, width)}", agreed=True
        )
    mean = total[:width] / samples

    # 2: the centred scatter matrix, reduced to rank 0 in blocks of rows; its eigenvectors.
    scatter = np.zeros((width, width))
    for where, _, _ in mine:
        x = _embeddings(where) - mean
        scatter += x.T @ x
    block = max(1, BLOCK_BYTES // (8 * width))
    summed = np.empty((block, width))
    for a in range(0, width, block):
        b = min(a + block, width)
        comm.Reduce(np.ascontiguousarray(scatter[a:b]), summed[: b - a], root=0)
        if rank == 0:
            scatter[a:b] = summed[: b - a]
    basis = np.empty((components, width))
    variance = np.empty(components)
    if rank == 0:
        values, vectors = np.linalg.eigh(scatter)  # ascending
        top = np.argsort(values)[::-1][:components]
        basis[:] = fix_signs(vectors[:, top].T)
        variance[:] = np.clip(values[top], 0, None)
        trace = float(np.trace(scatter))
    del scatter
    comm.Bcast(basis, root=0)

    # 3: projections, one shard at a time; rank 0 writes the components.
    agreed(comm, lambda: _make_dir(out / "projections") if rank == 0 else None)
    for where, _, _ in mine:
        _write_projection(out, where, (_embeddings(where) - mean) @ basis.T)
    if rank == 0:
        result = {
            "samples": samples,
            "features": width,
            "explained_variance": (variance / max(samples - 1, 1)).tolist(),
            "explained_variance_ratio": (variance / trace if trace > 0 else np.zeros_like(variance)).tolist(),
            "singular_values": np.sqrt(variance).tolist(),
        }
        with (out / "components.h5").writing_h5() as f:
            f.attrs["format"] = FORMAT
            f.attrs["samples"] = samples
            f.attrs["run"] = str(run)
            f["mean"], f["components"] = mean, basis
            for key in ("explained_variance", "explained_variance_ratio", "singular_values"):
                f[key] = np.array(result[key])
    comm.barrier()
    return result if rank == 0 else None


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Each row flipped so that its entry of largest magnitude (the first, on a tie) is positive."""
    pivots = components[np.arange(len(components)), np.argmax(np.abs(components), axis=1)]
    return components * np.where(pivots < 0, -1.0, 1.0)[:, None]


def _check(where: Location) -> tuple[Location, int, int]:
    """A prediction file's rows and embedding width, or an InputError naming it."""
    try:
        with where.open_h5(header_only=True) as f:
            if "embeddings" not in f:
                raise InputError(f"{where}: no embeddings (make them with: cai-hpc infer --embeddings)")
            rows, width = f["embeddings"].shape
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{where}: not a readable predictions file: {str(exc).splitlines()[0]}") from None
    return where, rows, width


def _embeddings(where: Location) -> np.ndarray:
    # Ranged reads on S3, so nothing of the file stays in memory after it is closed.
    with where.open_h5(header_only=True) as f:
        x = f["embeddings"][:].astype(np.float64)
    if not np.isfinite(x).all():
        raise InputError(f"{where}: embeddings hold NaN or inf")
    return x


def _write_projection(out: Location, where: Location, projection: np.ndarray) -> None:
    with where.open_h5(header_only=True) as src, (out / "projections" / where.name).writing_h5() as f:
        f.attrs["format"] = FORMAT
        f.attrs["source"] = str(src.attrs.get("source", where.name))
        f["projection"] = projection.astype(np.float32)
        if "object_id" in src:
            f["object_id"] = src["object_id"][: len(projection)]


def _make_dir(where: Location) -> None:
    try:
        where.make_dir()
    except OSError as exc:
        raise InputError(f"{where}: cannot create the output directory: {exc.strerror}") from None
