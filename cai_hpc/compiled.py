"""``--compile``: the fused model through ``torch.compile`` (Inductor) with its weights frozen in.

Freezing lets Inductor treat the weights as constants: it folds them, pre-casts the bf16
ones and prepacks them and the convolutions' for oneDNN, and fuses the element-wise work
(LayerNorm, GELU, softmax, the residual adds, the casts) into generated C++ kernels around the
GEMMs. That is where a bf16 run loses its time in eager mode (compiled, measured: 1.3x faster
in bf16). In float32 the eager model with the native kernels (``native.py``) is faster than the
compiled one: Inductor's own kernels for those steps measured slower (0.54-0.63 of the GEMM rate
against 0.71-0.80, on a 2-core Zen 5 VM).

The price is a compile when a process first calls the model: 25-28 s on an empty Inductor
cache, 14-18 s once the cache holds the generated kernels (measured on a 2-core AVX-512 VM), so
this pays only on long runs. One shape is compiled: batches are padded to the run's batch
size, so the last, shorter batch of a rank does not compile a second time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.async_compile import shutdown_compile_workers

from cai_hpc.layout import BANDS, IMAGE_SIZE

# Inductor loads torch's C++ extension helper, which logs a warning about CUDA_HOME on a CUDA
# build of torch without a GPU: noise for a CPU compile, and not one of our lines.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class CompiledModel:
    """``model`` compiled for batches of ``batch_size``; ``warm_up`` compiles it up front."""

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        self.batch_size = batch_size
        self.reference_parameters = getattr(model, "reference_parameters", None)
        self._device = next(model.parameters()).device
        self._compiled = torch.compile(model, dynamic=False, fullgraph=True)  # one graph, or an error

    def __call__(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} is larger than the compiled batch size {self.batch_size}")
        # Freezing needs the weights to be constants, which holds only without autograd. The
        # compile's worker processes are as many as this rank's threads, not the node's cores.
        with torch.inference_mode(), inductor_config.patch(freezing=True, compile_threads=torch.get_num_threads()):
            return self._compiled(_as_batch(images, self.batch_size), _as_batch(magnitudes, self.batch_size))[:n]

    def warm_up(self) -> float:
        """Compile now, on a batch of zeros; returns the seconds it took."""
        t0 = time.perf_counter()
        images = torch.zeros(self.batch_size, BANDS, IMAGE_SIZE, IMAGE_SIZE, device=self._device)
        self(images, torch.zeros(self.batch_size, BANDS, device=self._device))
        shutdown_compile_workers()  # idle for the rest of the run
        return time.perf_counter() - t0


def missing_toolchain() -> str | None:
    """What Inductor's C++ code generation needs and this machine lacks, or None."""
    if not (os.environ.get("CXX") or shutil.which("g++")):
        return "a C++ compiler (g++, or CXX naming one)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "the Python headers (Python.h, e.g. from python3-dev)"
    return None


def _as_batch(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` as an inference tensor of ``size`` rows, zero rows appended (zeros are finite,
    so nothing turns NaN). The compiled code is specialised to exactly that: a tensor made
    outside inference mode, or a shorter batch, would make Dynamo compile again. Must be
    called in inference mode; the copy costs well under 1 % of a batch's compute."""
    if rows.is_inference() and rows.shape[0] == size:
        return rows
    return torch.cat((rows, rows.new_zeros((size - rows.shape[0], *rows.shape[1:]))))
