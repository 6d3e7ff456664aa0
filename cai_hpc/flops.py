"""Counting the model's floating-point work per sample (counted, never typed in).

``gflop_per_sample(model)`` runs a model under torch's ``FlopCounterMode``. ``infer`` reports
``ASTROMAE_GFLOP_PER_SAMPLE`` instead: the same count for the reference ``AstroMAE``, worked
out from the sizes in ``layout.py``, because counting at run time would mean building the
timm-based reference model (the fused model does less work: ``head`` is merged away) and a
traced forward pass. A test holds the two equal.
"""

from __future__ import annotations

import torch

from cai_hpc.layout import (
    BANDS,
    BRANCH_DIM,
    DEPTH,
    EMBED_DIM,
    FUSION_DIM,
    HEADS,
    IMAGE_SIZE,
    INCEPTION_BLOCKS,
    INCEPTION_POOLS,
    MAG_DIM,
    MAG_LAYERS,
    MLP_RATIO,
    NUM_PATCHES,
    PATCH,
    PCM_GROUPS,
    STEM_DIM,
)


def gflop_per_sample(model: torch.nn.Module, batch: int = 4) -> float:
    """GFLOP (multiply and add counted separately) of one forward pass, per sample."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: only when counting

    images = torch.zeros(batch, BANDS, IMAGE_SIZE, IMAGE_SIZE)
    magnitudes = torch.zeros(batch, BANDS)
    # The math attention backend decomposes into matmuls, which the counter sees; the fused
    # CPU kernels are invisible to it.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, magnitudes)
    return counter.get_total_flops() / batch / 1e9


def astromae_multiply_adds() -> int:
    """Multiply-adds of one AstroMAE sample in what ``FlopCounterMode`` counts: convolutions,
    linear maps and matmuls (biases, norms, activations and pooling are not counted)."""
    tokens, hidden, head_dim = NUM_PATCHES + 1, EMBED_DIM * MLP_RATIO, EMBED_DIM // HEADS
    per_block = (
        NUM_PATCHES * 2 * hidden * EMBED_DIM // PCM_GROUPS  # the PCM's two grouped 1x1 convolutions
        + tokens * EMBED_DIM * 3 * EMBED_DIM  # qkv
        + HEADS * 2 * tokens * tokens * head_dim  # q @ k^T and attention @ v
        + tokens * EMBED_DIM * EMBED_DIM  # proj
        + tokens * 2 * EMBED_DIM * hidden  # the MLP
    )
    vit = NUM_PATCHES * EMBED_DIM * BANDS * PATCH * PATCH + DEPTH * per_block + EMBED_DIM * EMBED_DIM  # + head
    side = IMAGE_SIZE
    inception = side * side * BANDS * STEM_DIM
    for i in range(1, max(INCEPTION_BLOCKS) + 1):
        if i in INCEPTION_POOLS:
            side //= 2
            continue
        cin, width, use_5x5 = INCEPTION_BLOCKS[i]
        reducers = 4 if use_5x5 else 3  # 1x1 convolutions reading the block's input
        inception += side * side * (reducers * cin * width + width * width * (9 + (25 if use_5x5 else 0)))
    branch_heads = 2 * (EMBED_DIM * BRANCH_DIM + BRANCH_DIM * BRANCH_DIM)  # vit_block and the Inception head
    magnitudes = BANDS * MAG_DIM + (MAG_LAYERS - 1) * MAG_DIM * MAG_DIM
    fusion = (2 * BRANCH_DIM + MAG_DIM) * FUSION_DIM + FUSION_DIM
    return vit + inception + branch_heads + magnitudes + fusion


# Reported by ``infer`` as the model's work per sample (0.2215 GFLOP).
ASTROMAE_GFLOP_PER_SAMPLE = 2 * astromae_multiply_adds() / 1e9
