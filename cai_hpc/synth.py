"""A synthetic galaxy survey whose redshift can be learnt from its images and magnitudes.

Redshifts follow the shape of SDSS's main galaxy sample (p(z) ∝ z² exp(-(z/z0)^1.5), most
mass between 0.02 and 0.3). Each galaxy has a type (blue disk .. red spheroid) that sets its
luminosity, colours and profile; ugriz magnitudes come from a flat ΛCDM distance modulus
under a flux limit, with colours that redden with redshift as the 4000 Å break moves through
the bands. Images are Sérsic profiles whose angular size follows the physical size and the
angular-diameter distance, blurred by a per-band Gaussian PSF, in nanomaggies with per-band
sky noise. Every shard is drawn from its own seeded stream, so a dataset is reproducible
from (seed, samples, shard size).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cai_hpc.errors import InputError
from cai_hpc.shards import SIDE, Columns, DatasetWriter, rows_per_shard

H0 = 70.0  # km/s/Mpc
OMEGA_M = 0.3
C_KM_S = 299_792.458
Z0 = 0.075
FLUX_LIMIT_R = 17.77
PIXEL_ARCSEC = 0.396
PSF_FWHM_ARCSEC = np.array([1.5, 1.4, 1.3, 1.25, 1.3])
SKY_SIGMA_NMGY = np.array([0.12, 0.03, 0.04, 0.06, 0.2])
PHOT_SIGMA_MAG = np.array([0.05, 0.02, 0.02, 0.02, 0.04])
OBJECT_ID_BASE = 1_237_600_000_000_000_000
SLAB = 1024  # rows generated at a time: memory stays flat for any shard size

_Z_GRID = np.linspace(0.0, 2.0, 4001)
_E = np.sqrt(OMEGA_M * (1 + _Z_GRID) ** 3 + 1 - OMEGA_M)
_COMOVING_MPC = (C_KM_S / H0) * np.concatenate(([0.0], np.cumsum((1 / _E[1:] + 1 / _E[:-1]) / 2 * np.diff(_Z_GRID))))


def comoving_mpc(z: np.ndarray) -> np.ndarray:
    return np.interp(z, _Z_GRID, _COMOVING_MPC)


def generate(rng: np.random.Generator, n: int) -> Columns:
    """``n`` galaxies: images (n,5,32,32), magnitudes (n,5), redshift (n,), float32."""
    z = np.clip(Z0 * rng.gamma(2.0, size=n) ** (1 / 1.5), 0.005, 1.5)
    kind = rng.beta(0.8, 0.8, size=n)  # 0 = blue disk, 1 = red spheroid
    d_c = comoving_mpc(z)
    mu = 5 * np.log10((1 + z) * d_c * 1e6 / 10)
    k_corr = (0.2 + 0.9 * kind) * z
    abs_mag = rng.normal(-20.6 - 0.6 * kind, 0.9)
    # Flux limit: a galaxy too faint to be in the survey is made just bright enough.
    abs_mag = np.minimum(abs_mag, FLUX_LIMIT_R - mu - k_corr - np.abs(rng.normal(0, 0.3, n)))
    r = abs_mag + mu + k_corr
    u_g = 1.0 + 0.4 * kind + 2.5 * z + rng.normal(0, 0.1, n)
    g_r = 0.3 + 0.35 * kind + 2.2 * z + rng.normal(0, 0.05, n)
    r_i = 0.15 + 0.1 * kind + 1.0 * z + rng.normal(0, 0.04, n)
    i_z = 0.1 + 0.05 * kind + 0.6 * z + rng.normal(0, 0.04, n)
    g = r + g_r
    i = r - r_i
    mags = np.stack([g + u_g, g, r, i, i - i_z], axis=1)
    mags += rng.normal(0, PHOT_SIGMA_MAG, (n, 5))

    re_kpc = 10 ** rng.normal(0.55 - 0.2 * (abs_mag + 21.0), 0.1)
    kpc_per_arcsec = d_c / (1 + z) * 1e3 / 206_265
    re_px = np.clip(re_kpc / kpc_per_arcsec / PIXEL_ARCSEC, 0.5, 20.0)
    sersic_n = 1.0 + 3.0 * kind
    profile = _sersic_stamps(rng, re_px, sersic_n)
    flux = 10 ** (-0.4 * (mags - 22.5))  # nanomaggies
    images = _blur(flux[:, :, None, None] * profile[:, None], PSF_FWHM_ARCSEC / 2.355 / PIXEL_ARCSEC)
    images += rng.normal(0, 1, images.shape) * SKY_SIGMA_NMGY[None, :, None, None]
    return Columns(
        images=images.astype(np.float32),
        magnitudes=mags.astype(np.float32),
        redshift=z.astype(np.float32),
        object_id=None,
    )


def _sersic_stamps(rng: np.random.Generator, re_px: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Unit-total-flux Sérsic profiles sampled on the stamp (light outside it is lost)."""
    count = len(re_px)
    b = 2 * n - 1 / 3 + 0.009876 / n
    q = rng.uniform(0.3, 1.0, count)
    theta = rng.uniform(0, np.pi, count)
    centre = (SIDE - 1) / 2 + rng.normal(0, 0.5, (count, 2))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    major = dx * cos + dy * sin
    minor = (-dx * sin + dy * cos) / q[:, None, None]
    radius = np.hypot(major, minor) / re_px[:, None, None]
    light = np.exp(-b[:, None, None] * (radius ** (1 / n[:, None, None]) - 1))
    lgamma = np.array([math.lgamma(2 * v) for v in n])
    total = 2 * np.pi * n * q * re_px**2 * np.exp(b + lgamma - 2 * n * np.log(b))
    return light / total[:, None, None]


def _blur(images: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """Gaussian PSF per band, applied in Fourier space."""
    fy = np.fft.fftfreq(SIDE)[:, None]
    fx = np.fft.rfftfreq(SIDE)[None, :]
    transfer = np.exp(-2 * np.pi**2 * sigma_px[:, None, None] ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(images) * transfer[None], s=(SIDE, SIDE))


def synthesize(out: Path, samples: int, shard_mb: float, seed: int) -> int:
    """Write a synthetic dataset of ``samples`` rows to ``out``; returns the shard count."""
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    if not 0 <= seed < 2**31:
        raise InputError(f"--seed must be in [0, 2**31), got {seed}")
    per_shard = rows_per_shard(shard_mb)
    attrs = {"source": "cai-hpc synth", "seed": seed}
    with DatasetWriter(out, samples, per_shard, labelled=True, has_object_id=True, attrs=attrs) as writer:
        for shard, first in enumerate(range(0, samples, per_shard)):
            rng = np.random.default_rng([seed, shard])
            rows = min(per_shard, samples - first)
            for a in range(0, rows, SLAB):
                cols = generate(rng, min(SLAB, rows - a))
                start = first + a
                cols.object_id = OBJECT_ID_BASE + seed * 100_000_000 + np.arange(start, start + len(cols.images))
                writer.add(cols)
        return writer.shard_count
