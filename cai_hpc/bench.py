"""``cai-hpc bench kernel``: per-rank compute efficiency, measured in one process.

Efficiency = samples/s x GFLOP/sample / GEMM rate, where the GEMM rate is measured by this
same process with the same threads and precision: a ratio taken in one run, so it holds on a
noisy shared machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cai_hpc.fast import fuse
from cai_hpc.flops import gflop_per_sample
from cai_hpc.model import BANDS, IMAGE_SIZE, AstroMAE

GEMM_SIZE = 2048


def _rate(step: Callable[[], None], seconds: float) -> tuple[int, float]:
    """(calls, elapsed) of ``step`` run for at least ``seconds`` and 3 calls, after a warm-up."""
    step()
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    return calls, time.perf_counter() - t0


def gemm_gflops(seconds: float, dtype: torch.dtype = torch.float32) -> float:
    """GEMM rate of this process at its current thread count and ``dtype``, in GFLOP/s."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    calls, elapsed = _rate(lambda: torch.mm(a, b), seconds)
    return 2 * GEMM_SIZE**3 * calls / elapsed / 1e9


def model_samples_per_s(model: torch.nn.Module, batch: int, seconds: float) -> float:
    images = torch.randn(batch, BANDS, IMAGE_SIZE, IMAGE_SIZE)
    mags = torch.randn(batch, BANDS) + 18.0

    def step() -> None:
        with torch.inference_mode():
            model(images, mags)

    calls, elapsed = _rate(step, seconds)
    return batch * calls / elapsed


def kernel_table(
    batch_sizes: list[int], threads: list[int], seconds: float, precision: str = "fp32"
) -> list[dict[str, float]]:
    """One row per (threads, batch): GEMM rate in the run's precision, samples/s of the fused
    model ``infer`` runs and of the plain float32 eager model, and the fused model's compute
    efficiency."""
    torch.manual_seed(0)
    model = AstroMAE().eval()
    fused = fuse(model, precision)
    gflop = gflop_per_sample(model)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        gemm = gemm_gflops(seconds, torch.bfloat16 if precision == "bf16" else torch.float32)
        for batch in batch_sizes:
            rate = model_samples_per_s(fused, batch, seconds)
            rows.append(
                {
                    "threads": t,
                    "batch": batch,
                    "gemm_gflops": gemm,
                    "samples_per_s": rate,
                    "eager_samples_per_s": model_samples_per_s(model, batch, seconds),
                    "gflop_per_sample": gflop,
                    "efficiency": rate * gflop / gemm,
                }
            )
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [f"{'threads':>7} {'batch':>6} {'GEMM GFLOP/s':>13} {'samples/s':>10} {'efficiency':>10} {'eager/s':>8}"]
    for r in rows:
        lines.append(
            f"{r['threads']:>7} {r['batch']:>6} {r['gemm_gflops']:>13.1f} "
            f"{r['samples_per_s']:>10.1f} {r['efficiency']:>10.2f} {r['eager_samples_per_s']:>8.1f}"
        )
    return "\n".join(lines)
