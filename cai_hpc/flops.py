"""Counting the model's floating-point work per sample (counted, never typed in)."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cai_hpc.model import BANDS, IMAGE_SIZE


def gflop_per_sample(model: torch.nn.Module, batch: int = 4) -> float:
    """GFLOP (multiply and add counted separately) of one forward pass, per sample."""
    images = torch.zeros(batch, BANDS, IMAGE_SIZE, IMAGE_SIZE)
    magnitudes = torch.zeros(batch, BANDS)
    # The math attention backend decomposes into matmuls, which the counter sees; the fused
    # CPU kernels are invisible to it.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, magnitudes)
    return counter.get_total_flops() / batch / 1e9
