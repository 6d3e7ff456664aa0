"""Redshift metrics reduced across ranks (DESIGN.md definitions).

No rank ever holds another rank's residuals: sums go through allreduce in float64, and
the medians NMAD needs come from an exact distributed selection over the float64 bit
patterns, a fixed number (at most 64) of scalar allreduces per median.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OUTLIER_DZ = 0.15
NMAD_SCALE = 1.4826
_LOW_BITS = np.int64(0x7FFFFFFFFFFFFFFF)


def regression_metrics(comm: Any, z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, float] | None:
    """MAE, MSE, bias, NMAD, R² and outlier fraction over every rank's samples, on all ranks.

    Returns None when no rank has a labelled sample.
    """
    pred = np.asarray(z_pred, dtype=np.float64)
    true = np.asarray(z_true, dtype=np.float64)
    count, sum_true = comm.allreduce(np.array([pred.size, true.sum()], dtype=np.float64))
    n = int(count)
    if n == 0:
        return None
    err = pred - true
    dz = err / (1.0 + true)
    mean_true = sum_true / n
    sums = comm.allreduce(
        np.array(
            [
                np.abs(err).sum(),
                np.square(err).sum(),
                dz.sum(),
                np.square(true - mean_true).sum(),
                np.count_nonzero(np.abs(dz) > OUTLIER_DZ),
            ],
            dtype=np.float64,
        )
    )
    abs_err, sq_err, sum_dz, ss_tot, outliers = (float(v) for v in sums)
    median_dz = distributed_median(comm, dz)
    nmad = NMAD_SCALE * distributed_median(comm, np.abs(dz - median_dz))
    return {
        "mae": abs_err / n,
        "mse": sq_err / n,
        "bias": sum_dz / n,
        "nmad": nmad,
        "r2": 1.0 - sq_err / ss_tot if ss_tot > 0 else None,
        "outlier_frac": outliers / n,
        "labelled": n,
    }


def distributed_median(comm: Any, values: np.ndarray) -> float:
    """numpy's median of the union of every rank's ``values``, exactly."""
    keys = _order_keys(np.asarray(values, dtype=np.float64).ravel())
    n = comm.allreduce(keys.size)
    if n == 0:
        return float("nan")
    low = distributed_kth(comm, keys, (n - 1) // 2)
    high = low if n % 2 else distributed_kth(comm, keys, n // 2)
    return float((_from_key(low) + _from_key(high)) / 2.0)


def distributed_kth(comm: Any, keys: np.ndarray, k: int) -> int:
    """The k-th smallest (0-based) of every rank's int64 ``keys``, by bisection on the value.

    Each round counts, on every rank, the keys at or below the midpoint; the local
    candidates shrink with the interval, so later rounds touch few elements.
    """
    bounds = comm.allgather((int(keys.min()), int(keys.max())) if keys.size else None)
    lo = min(b[0] for b in bounds if b is not None)
    hi = max(b[1] for b in bounds if b is not None)
    below = 0  # local keys known to be < lo
    candidates = keys
    while lo < hi:
        mid = (lo + hi) // 2
        at_or_below = candidates <= mid
        local = int(np.count_nonzero(at_or_below))
        if comm.allreduce(below + local) >= k + 1:
            hi = mid
            candidates = candidates[at_or_below]
        else:
            lo = mid + 1
            below += local
            candidates = candidates[~at_or_below]
    return lo


def _order_keys(x: np.ndarray) -> np.ndarray:
    """int64 keys that sort like the float64 values (IEEE-754 trick: flip negatives)."""
    bits = x.view(np.int64)
    return np.where(bits < 0, bits ^ _LOW_BITS, bits)


def _from_key(key: int) -> float:
    k = np.int64(key)
    bits = k ^ _LOW_BITS if k < 0 else k
    return float(np.array([bits], dtype=np.int64).view(np.float64)[0])
