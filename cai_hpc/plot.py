"""``cai-hpc plot OUT``: predicted-vs-true redshift density and the Δz histogram."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cai_hpc.errors import InputError
from cai_hpc.metrics import NMAD_SCALE, OUTLIER_DZ


def read_labelled_predictions(out: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted((out / "predictions").glob("*.h5"))
    if not files:
        raise InputError(f"{out}: no predictions/*.h5 files (run 'cai-hpc infer --out {out}' first)")
    preds, trues = [], []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                if "redshift" in f:
                    preds.append(f["redshift_pred"][:])
                    trues.append(f["redshift"][:])
        except (OSError, KeyError) as exc:
            raise InputError(f"{path}: not a readable predictions file: {exc}") from None
    if not preds:
        raise InputError(f"{out}: the predictions carry no true redshift to compare with")
    return np.concatenate(preds), np.concatenate(trues)


def plot(out: Path, dest: Path | None = None) -> Path:
    """Draw the two panels to ``dest`` (default ``OUT/redshift.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    pred, true = read_labelled_predictions(out)
    dz = (pred - true) / (1 + true)
    nmad = NMAD_SCALE * np.median(np.abs(dz - np.median(dz)))
    outliers = np.mean(np.abs(dz) > OUTLIER_DZ)
    dest = dest or out / "redshift.png"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    hi = float(np.percentile(np.concatenate([pred, true]), 99.5))
    ax1.hist2d(true, pred, bins=120, range=[[0, hi], [0, hi]], norm=LogNorm(), cmap="viridis")
    ax1.plot([0, hi], [0, hi], "r--", lw=1)
    ax1.set(xlabel="spectroscopic redshift z", ylabel="predicted redshift ẑ", title=f"{len(pred):,} galaxies")
    ax2.hist(dz, bins=120, range=(-0.3, 0.3), color="steelblue")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set(
        xlabel="Δz = (ẑ − z) / (1 + z)",
        ylabel="galaxies",
        title=f"bias {dz.mean():+.4f}   NMAD {nmad:.4f}   outliers {outliers:.2%}",
    )
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest
