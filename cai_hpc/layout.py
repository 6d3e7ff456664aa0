"""AstroMAE's sizes, and the names and shapes of its weights, known without building it.

The reference model (``model.py``, built from timm parts) and its fused inference form
(``fast.py``, built straight from a state dict, so inference never imports timm) share these.
Tests check ``state_dict_shapes()`` against ``AstroMAE().state_dict()`` and against the
reference's own key list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

IMAGE_SIZE = 32
BANDS = 5
PATCH = 8
EMBED_DIM = 192
DEPTH = 12
HEADS = 3
MLP_RATIO = 4
PCM_GROUPS = 48
BRANCH_DIM = 1096
MAG_DIM = 1024
MAG_LAYERS = 5  # Linear(5 -> 1024), then four Linear(1024 -> 1024)
FUSION_DIM = 1024
STEM_DIM = 32  # the Inception branch opens with a plain 1x1 Conv2d(5 -> 32)
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2

# ``inception_model.vis_inception`` position -> (input channels, branch width, 5x5 branch run);
# an AvgPool2d(2) sits at positions 1, 4 and 7, the head (flatten, Linear, ReLU, Linear) at 9-12.
INCEPTION_BLOCKS = {2: (32, 16, True), 3: (64, 16, True), 5: (64, 8, True), 6: (32, 8, True), 8: (32, 4, False)}
INCEPTION_POOLS = (1, 4, 7)
INCEPTION_HEAD = (10, 12)

# One module under two names, as in the reference: alias -> name. A state_dict holds both;
# a safetensors file written by ``save_weights`` keeps only ``conv2d_init``. When both are
# given, a strict ``load_state_dict`` leaves the ``vis_inception.0`` tensors in the shared
# module (they are loaded last), so those are the ones that count.
ALIASES = {"inception_model.vis_inception.0": "inception_model.conv2d_init"}
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

Shapes = dict[str, tuple[int, ...]]


def _linear(name: str, fan_in: int, fan_out: int) -> Shapes:
    return {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}


def _conv(name: str, cin: int, cout: int, kernel: int, groups: int = 1) -> Shapes:
    return {f"{name}.weight": (cout, cin // groups, kernel, kernel), f"{name}.bias": (cout,)}


def _norm(name: str, dim: int) -> Shapes:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _batch_norm(name: str, dim: int) -> Shapes:
    stats = {f"{name}.running_mean": (dim,), f"{name}.running_var": (dim,), f"{name}.num_batches_tracked": ()}
    return _norm(name, dim) | stats


def _conv_block(name: str, cin: int, cout: int, kernel: int) -> Shapes:
    return _conv(f"{name}.conv", cin, cout, kernel) | _batch_norm(f"{name}.bn", cout)


def state_dict_shapes() -> Shapes:
    """Every key of the reference ``ViT_Astro.state_dict()`` with its shape (both alias names)."""
    hidden = EMBED_DIM * MLP_RATIO
    shapes: Shapes = _conv("patch_embed.proj", BANDS, EMBED_DIM, PATCH)
    shapes["cls_token"] = (1, 1, EMBED_DIM)
    shapes["pos_embed"] = (1, NUM_PATCHES + 1, EMBED_DIM)
    for i in range(DEPTH):
        p = f"blocks.{i}"
        shapes |= _norm(f"{p}.norm1", EMBED_DIM)
        shapes |= {f"{p}.attn.q_bias": (EMBED_DIM,), f"{p}.attn.v_bias": (EMBED_DIM,)}
        shapes[f"{p}.attn.qkv.weight"] = (3 * EMBED_DIM, EMBED_DIM)
        shapes |= _linear(f"{p}.attn.proj", EMBED_DIM, EMBED_DIM)
        shapes |= _norm(f"{p}.norm2", EMBED_DIM)
        shapes |= _linear(f"{p}.mlp.fc1", EMBED_DIM, hidden) | _linear(f"{p}.mlp.fc2", hidden, EMBED_DIM)
        shapes |= _conv(f"{p}.PCM.0", EMBED_DIM, hidden, 1, PCM_GROUPS) | _batch_norm(f"{p}.PCM.1", hidden)
        shapes |= _conv(f"{p}.PCM.3", hidden, EMBED_DIM, 1, PCM_GROUPS)
    shapes |= _norm("fc_norm", EMBED_DIM) | _linear("head", EMBED_DIM, EMBED_DIM)
    shapes |= _linear("vit_block.0", EMBED_DIM, BRANCH_DIM) | _linear("vit_block.2", BRANCH_DIM, BRANCH_DIM)
    for name in (*ALIASES.values(), *ALIASES):
        shapes |= _conv(name, BANDS, STEM_DIM, 1)
    for i, (cin, width, _) in INCEPTION_BLOCKS.items():
        # The last block's 5x5 branch is built (its weights are in the checkpoint) but not run.
        p = f"inception_model.vis_inception.{i}"
        shapes |= _conv_block(f"{p}.branch1", cin, width, 1)
        shapes |= _conv_block(f"{p}.branch2.0", cin, width, 1) | _conv_block(f"{p}.branch2.1", width, width, 3)
        shapes |= _conv_block(f"{p}.branch3.0", cin, width, 1) | _conv_block(f"{p}.branch3.1", width, width, 5)
        shapes |= _conv_block(f"{p}.branch4.1", cin, width, 1)
    first, second = INCEPTION_HEAD
    shapes |= _linear(f"inception_model.vis_inception.{first}", EMBED_DIM, BRANCH_DIM)
    shapes |= _linear(f"inception_model.vis_inception.{second}", BRANCH_DIM, BRANCH_DIM)
    for j in range(MAG_LAYERS):
        shapes |= _linear(f"inception_model.magnitude_block.{2 * j}", BANDS if j == 0 else MAG_DIM, MAG_DIM)
    shapes |= _linear("concat_block.0", 2 * BRANCH_DIM + MAG_DIM, FUSION_DIM) | _linear("concat_block.2", FUSION_DIM, 1)
    return shapes


def parameter_count(shapes: Mapping[str, Sequence[int]]) -> int:
    """Trainable parameters of a full state dict (by shapes): BatchNorm statistics are buffers,
    and the aliased module counts once (15,902,889 for AstroMAE)."""
    return sum(
        math.prod(shape)
        for key, shape in shapes.items()
        if key.rsplit(".", 1)[-1] not in BN_BUFFERS and key.rsplit(".", 1)[0] not in ALIASES
    )
