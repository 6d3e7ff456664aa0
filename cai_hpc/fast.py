"""AstroMAE's inference form: the same function in fewer, larger kernels, built from weights.

``FusedAstroMAE.from_state_dict(state)`` takes the reference model's tensors by their
``state_dict`` names (a checkpoint's, or ``AstroMAE().state_dict()``), checks them strictly,
and rewrites them once:

* every BatchNorm is folded into the convolution before it;
* the three 1x1 convolutions that open an Inception block's branches (they read the same
  input) become one convolution, split afterwards, and the branch runs channels-last;
* the PCM's grouped 1x1 convolutions become batched matmuls on the patch tokens;
* the attention's q/v bias vector is built once, not on every call;
* ``head`` and the first layer of ``vit_block`` (two linear maps with nothing between them)
  become one linear map;
* the attention's scale (1/8, so exact) is folded into q's weights;
* the Inception stem's 1x1 convolution and 2x2 average pool become one 2x2 convolution of
  stride 2 (with channels-last weights, so that the Inception branch runs channels-last), the
  3x3 max-pools are taken as row and column maxima or by a native kernel (``max_pool_3x3``),
  and in float32 each convolution applies its ReLU inside oneDNN's kernel (``conv_relu``);
* float32 linear maps run through oneDNN rather than torch's default BLAS, with the ReLU or
  GELU after them applied inside the GEMM (``linear``; fc1's GELU, where that measured faster
  with the native kernels, as torch's own pass after it: ``FusedBlock.hidden``) and their
  weights packed in oneDNN's layout on first use (``Linear``);
* in float32 on the CPU, each ViT block's steps between its linear maps (attention, PCM,
  residual adds, LayerNorms) run as three hand-written kernels (``native.py``) where a C++
  compiler is at hand, and as the torch code of ``FusedBlock.forward`` otherwise.

It is an inference model: its weights are frozen, and its oneDNN linear maps and in-place
steps have no gradients.

Only torch is needed: inference never builds the timm-based reference model (``model.py``),
so it never imports timm. ``model.AstroMAE`` stays the reference: tests check that the fused
model computes the same outputs (within float32 rounding) and the golden outputs.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cai_hpc import native
from cai_hpc.errors import InputError
from cai_hpc.layout import (
    ALIASES,
    DEPTH,
    EMBED_DIM,
    HEADS,
    INCEPTION_BLOCKS,
    INCEPTION_HEAD,
    INCEPTION_POOLS,
    MAG_LAYERS,
    PCM_GROUPS,
    parameter_count,
    state_dict_shapes,
)

PRECISIONS = ("fp32", "bf16")
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the reference uses
LN_EPS = 1e-6
Weights = Mapping[str, torch.Tensor]


def _names(keys: list[str], most: int = 4) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def checked_weights(state: Weights) -> dict[str, torch.Tensor]:
    """The reference's tensors, checked like a strict ``load_state_dict``: every key present
    (either name of the aliased module will do), none unexpected, every shape right.

    Returns them with both alias names filled in and floating tensors as float32 (what
    loading into the float32 reference model would make of them); raises ``InputError``
    naming the keys at fault.
    """
    expected = state_dict_shapes()
    given = dict(state)
    for alias, name in ALIASES.items():
        for suffix in ("weight", "bias"):
            first, second = f"{alias}.{suffix}", f"{name}.{suffix}"
            if first in given or second in given:
                given[first] = given[second] = given.get(first, given.get(second))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else []
        )
        raise InputError(f"weights do not fit AstroMAE: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(given[k].shape)} (needs {expected[k]})" for k in expected if given[k].shape != expected[k]]
    if wrong:
        raise InputError(f"weights do not fit AstroMAE: wrong shape {_names(wrong, 3)}")
    not_float = [k for k in expected if not k.endswith("num_batches_tracked") and not given[k].is_floating_point()]
    if not_float:
        raise InputError(f"weights do not fit AstroMAE: not floating point {_names(not_float)}")
    return {k: t.detach().float() if t.is_floating_point() else t.detach() for k, t in given.items()}


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach(), requires_grad=False)


def _conv(weight: torch.Tensor, bias: torch.Tensor, groups: int = 1, **kwargs: int) -> nn.Conv2d:
    """A Conv2d holding these tensors (made on the meta device, so no initialisation is wasted)."""
    out_channels, in_per_group, kernel, _ = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_channels, kernel, groups=groups, device="meta", **kwargs)
    conv.weight, conv.bias = _frozen(weight), _frozen(bias)
    return conv


# What ``linear`` can apply to its output inside the GEMM's own kernel (oneDNN post-ops).
ACTIVATIONS = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu}
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACKS = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_CONV_ONEDNN = _ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "none",
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``, float32 on the CPU through oneDNN.

    torch's float32 GEMM is MKL's, and MKL runs its AVX2 code on AMD CPUs: on a Zen 5 VM,
    measured, 105 GFLOP/s per core where oneDNN's AVX-512 kernels reach 230, with the same
    float32 accuracy. oneDNN also applies the activation while the output is in cache, which
    saves a pass over it, and takes ``packed``, ``weight`` in its own layout (``pack``), if
    given. Under autocast the call is left to ``F.linear``, which autocast casts (bfloat16
    already goes through oneDNN).
    """
    if _onednn_float32(x, weight):
        # The "none" algorithm of oneDNN's GELU is the exact (erf) one, as F.gelu's default.
        algorithm = "none" if activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(
            x, weight if packed is None else packed, bias, activation, [], algorithm
        )
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout, for ``linear``'s ``packed``: an opaque oneDNN
    tensor that only ``linear``'s oneDNN path can read."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _onednn_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and torch.backends.mkldnn.enabled
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    )


class Linear(nn.Linear):
    """``nn.Linear`` through ``linear``, with its activation (``ACTIVATIONS``) applied, and its
    weight packed for oneDNN on its first float32 call on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> None:
        super().__init__(weight.shape[1], weight.shape[0], device="meta")  # meta: nothing initialised
        self.weight, self.bias = _frozen(weight), _frozen(bias)
        self.activation = activation
        # Packed once rather than reordered by oneDNN on every call: the float32 model ran
        # 1.03-1.06x faster (interleaved A/B on a Zen 5 VM, same outputs). Not a buffer, being
        # opaque; made on first use, so a bf16 model's autocast layers never hold one, and
        # made again if the weight is replaced or changed in place (``_packed_from``).
        self.packed: torch.Tensor | None = None
        self._packed_from: tuple[int, int | None] | None = None

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """The map and its activation, or ``activation`` instead ("none": the GEMM alone)."""
        activation = self.activation if activation is None else activation
        # Compiled, Inductor sees the plain weight (it cannot trace an opaque tensor).
        if not _PACKS or torch.compiler.is_compiling() or not _onednn_float32(x, self.weight):
            return linear(x, self.weight, self.bias, activation)
        weight = self.weight  # an inference tensor (made in inference mode) has no version
        source = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        if self._packed_from != source:
            self.packed, self._packed_from = pack(weight), source
        return linear(x, self.weight, self.bias, activation, self.packed)

    def __getstate__(self) -> dict:
        # An opaque oneDNN tensor has no storage to copy or pickle; the copy packs its own.
        return {**super().__getstate__(), "packed": None, "_packed_from": None}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def _linear(w: Weights, name: str, activation: str = "none") -> Linear:
    return Linear(w[f"{name}.weight"], w[f"{name}.bias"], activation)


def _layer_norm(w: Weights, name: str) -> nn.LayerNorm:
    norm = nn.LayerNorm(EMBED_DIM, eps=LN_EPS, device="meta")
    norm.weight, norm.bias = _frozen(w[f"{name}.weight"]), _frozen(w[f"{name}.bias"])
    return norm


def _fold_bn(w: Weights, conv: str, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of convolution ``conv`` with the eval-mode BatchNorm ``bn`` after it folded in."""
    scale = w[f"{bn}.weight"] / torch.sqrt(w[f"{bn}.running_var"] + BN_EPS)
    weight = w[f"{conv}.weight"] * scale.reshape(-1, 1, 1, 1)
    bias = (w[f"{conv}.bias"] - w[f"{bn}.running_mean"]) * scale + w[f"{bn}.bias"]
    return weight, bias


def _folded_unit(w: Weights, unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv-BN-ReLU unit's convolution, BatchNorm folded in."""
    return _fold_bn(w, f"{unit}.conv", f"{unit}.bn")


def _same_conv(weight_bias: tuple[torch.Tensor, torch.Tensor]) -> nn.Conv2d:
    weight, bias = weight_bias
    return _conv(weight, bias, padding=weight.shape[-1] // 2)


class FusedInception(nn.Module):
    def __init__(self, w: Weights, prefix: str, width: int, use_5x5: bool, use_native: bool = True) -> None:
        super().__init__()
        self.width = width
        self.use_native = use_native
        reducers = [f"{prefix}.branch1", f"{prefix}.branch2.0"] + ([f"{prefix}.branch3.0"] if use_5x5 else [])
        folded = [_folded_unit(w, unit) for unit in reducers]
        # Convolutions of one input, as one convolution whose outputs are theirs, concatenated.
        self.reduce = _conv(torch.cat([wt for wt, _ in folded]), torch.cat([b for _, b in folded]))
        self.conv3 = _same_conv(_folded_unit(w, f"{prefix}.branch2.1"))
        self.conv5 = _same_conv(_folded_unit(w, f"{prefix}.branch3.1")) if use_5x5 else None
        self.pool_proj = _same_conv(_folded_unit(w, f"{prefix}.branch4.1"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = conv_relu(self.reduce, x).split(self.width, dim=1)
        outs = [reduced[0], conv_relu(self.conv3, reduced[1])]
        if self.conv5 is not None:
            outs.append(conv_relu(self.conv5, reduced[2]))
        outs.append(conv_relu(self.pool_proj, max_pool_3x3(x, self.use_native)))
        return torch.cat(outs, dim=1)


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.relu(conv(x))``; in float32 on the CPU one oneDNN convolution with the ReLU as its
    post-op, which saves a pass over the output (the Inception branch 1.07x faster at 1 thread,
    1.12x at 2, measured on a Zen 5 VM; same outputs, bit for bit)."""
    if _CONV_ONEDNN and _onednn_float32(x, conv.weight) and not torch.compiler.is_compiling():
        padding, stride, dilation = (list(p) for p in (conv.padding, conv.stride, conv.dilation))
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, padding, stride, dilation, conv.groups, "relu", [], ""
        )
    return F.relu(conv(x))


def max_pool_3x3(x: torch.Tensor, use_native: bool = True) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride=1, padding=1)``, exactly: by the native kernel for
    channels-last float32 on the CPU where it is built (unless ``use_native`` is false), else as
    1-D maxima over rows and then columns. For 256x64x16x16 channels-last float32 at 2 threads
    on a Zen 5 VM: aten's kernel 2.6-2.9 ms, the two passes 1.7-1.9 ms, the native kernel's one
    pass 1.2-1.3 ms (measured with ``allocator.reuse_freed_memory``; without it, aten's took
    11.5 ms)."""
    if torch.compiler.is_compiling():
        # Inductor writes its own pooling kernel; the writes into views below would split its graph.
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if use_native and native.applies(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        kernels = kernel_choice().kernels
        if kernels is not None:
            return kernels.max_pool_3x3(x)
    return _max_of_neighbours(_max_of_neighbours(x, -2), -1)


def _max_of_neighbours(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Each element's maximum with its one or two neighbours along ``dim``."""
    out = torch.empty_like(x)  # same memory format
    n = x.shape[dim]
    torch.maximum(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), out=out.narrow(dim, 1, n - 1))
    out.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    torch.maximum(out.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
    return out


def _group_matrices(weight: torch.Tensor) -> torch.Tensor:
    """A grouped 1x1 convolution's weight as (groups, in per group, out per group)."""
    out_channels, in_per_group = weight.shape[:2]
    return weight.reshape(PCM_GROUPS, out_channels // PCM_GROUPS, in_per_group).transpose(1, 2).contiguous()


class FusedBlock(nn.Module):
    def __init__(self, w: Weights, prefix: str) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.norm1, self.norm2 = _layer_norm(w, f"{prefix}.norm1"), _layer_norm(w, f"{prefix}.norm2")
        self.mlp = nn.Sequential(_linear(w, f"{prefix}.mlp.fc1", "gelu"), _linear(w, f"{prefix}.mlp.fc2"))
        q_bias, v_bias = w[f"{prefix}.attn.q_bias"], w[f"{prefix}.attn.v_bias"]
        # The attention's scale, 1/8 (a power of two, so exact), is folded into q's rows.
        scale = torch.ones(3 * EMBED_DIM, 1)
        scale[:EMBED_DIM] = (EMBED_DIM // HEADS) ** -0.5
        qkv_bias = torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))
        self.qkv = Linear(w[f"{prefix}.attn.qkv.weight"] * scale, qkv_bias * scale[:, 0])
        self.proj = _linear(w, f"{prefix}.attn.proj")
        # The PCM's grouped 1x1 convolutions act on each patch token alone: as batched matmuls
        # over the groups, (groups, tokens, in) @ (groups, in, out), with the BatchNorm folded in.
        pcm_w1, pcm_b1 = _fold_bn(w, f"{prefix}.PCM.0", f"{prefix}.PCM.1")
        self.groups = PCM_GROUPS
        self.register_buffer("pcm_w1", _group_matrices(pcm_w1))
        self.register_buffer("pcm_b1", pcm_b1.reshape(self.groups, 1, -1))
        self.register_buffer("pcm_w2", _group_matrices(w[f"{prefix}.PCM.3.weight"]))
        self.register_buffer("pcm_b2", w[f"{prefix}.PCM.3.bias"].reshape(self.groups, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        tokens = x[:, 1:].reshape(b * (n - 1), self.groups, -1).transpose(0, 1)
        hidden = F.silu(torch.baddbmm(self.pcm_b1, tokens, self.pcm_w1))
        conv = torch.baddbmm(self.pcm_b2, hidden, self.pcm_w2).transpose(0, 1).reshape(b, n - 1, c)
        qkv = self.qkv(self.norm1(x))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # 17 tokens: plain matmuls beat the fused attention kernel's set-up cost here.
        attended = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, c))
        if torch.compiler.is_compiling():
            # Inductor fuses the concatenation (and fails on the in-place form after a GEMM).
            x = torch.cat((x[:, :1], x[:, 1:] + conv), dim=1)
        else:
            x[:, 1:] += conv  # x is this block's own tensor: in place, no concatenation
        return x + self.mlp(self.norm2(x))

    def forward_native(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,
        kernels: native.Kernels,
        next_norm: nn.LayerNorm | None,
        gelu_after_gemm: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(x)`` through ``kernels`` between the linear maps, given ``normed =
        self.norm1(x)``; returns the output and ``next_norm`` of it (None without ``next_norm``),
        which the next block's norm1 would otherwise compute in a pass of its own.
        ``gelu_after_gemm``: fc1's GELU as a pass of its own (``hidden``)."""
        out = self.proj(kernels.attention(self.qkv(normed)))
        pcm = (self.pcm_w1, self.pcm_b1, self.pcm_w2, self.pcm_b2)
        normed2 = kernels.pcm_residual_norm(x, out, pcm, self.norm2)  # out: x after attention and PCM
        mlp = self.mlp[1](self.hidden(normed2, gelu_after_gemm))
        if next_norm is None:
            return mlp.add_(out), None
        return mlp, kernels.add_norm(mlp, out, next_norm)

    def hidden(self, normed: torch.Tensor, gelu_after_gemm: bool = False) -> torch.Tensor:
        """fc1 and its GELU: inside oneDNN's GEMM (a post-op), or with ``gelu_after_gemm`` as
        torch's in-place GELU after it, a pass of its own over the output that still measured
        faster than oneDNN's AVX2 post-op (Zen 5 VM held to AVX2, batch 128, 1 thread: the
        post-op 1.6 ms of fc1's 6.6, torch's pass 0.4-0.9 ms). Both are the exact (erf) GELU."""
        fc1 = self.mlp[0]
        return torch.ops.aten.gelu_(fc1(normed, activation="none")) if gelu_after_gemm else fc1(normed)


def kernel_choice() -> native.Choice:
    """Whether the ViT blocks and max-pools run on the native kernels here (and why): where they
    are built and, on this CPU, at least as fast as torch's (``native.decide``)."""
    return _kernel_choice(os.environ.get("CAI_HPC_NATIVE", "auto"))


@functools.cache
def _kernel_choice(setting: str) -> native.Choice:  # one answer per setting of CAI_HPC_NATIVE
    choice = native.decide(_native_speedup)
    native.log.info("ViT blocks' steps between the linear maps: %s kernels (%s)", choice.label, choice.reason)
    return choice


SPEEDUP_BATCH, SPEEDUP_ROUNDS = 64, 7


def _native_speedup(kernels: native.Kernels) -> native.Measured:
    """torch's time over the kernels' for one ViT block's forward (norm of the next block
    included, as ``_encode`` runs it) at this thread count, fc1's GELU inside oneDNN's GEMM or
    after it (``FusedBlock.hidden``), whichever is faster: medians of interleaved rounds, so that load
    from other processes weighs on every side alike."""
    rng = torch.Generator().manual_seed(0)  # its own: the caller's random state stays as it was
    shapes = {name: shape for name, shape in state_dict_shapes().items() if name.startswith("blocks.0.")}
    weights = {name: torch.randn(shape, generator=rng) * 0.05 for name, shape in shapes.items()}
    weights["blocks.0.PCM.1.running_var"] = torch.ones(shapes["blocks.0.PCM.1.running_var"])
    block = FusedBlock(weights, "blocks.0")
    x = torch.randn(SPEEDUP_BATCH, native.TOKENS, EMBED_DIM, generator=rng)
    with torch.inference_mode():
        normed = block.norm1(x)
        steps = (
            lambda: block.norm1(block(x)),
            lambda: block.forward_native(x, normed, kernels, block.norm1),
            lambda: block.forward_native(x, normed, kernels, block.norm1, gelu_after_gemm=True),
        )
        rounds = []
        for _ in range(SPEEDUP_ROUNDS + 1):  # the first round warms all up (oneDNN packs the weights)
            seconds = []
            for step in steps:
                t0 = time.perf_counter()
                step()
                step()
                seconds.append(time.perf_counter() - t0)
            rounds.append(seconds)
    rounds = rounds[1:]
    gelu_after_gemm = statistics.median(after / inside for _, inside, after in rounds) < 1.0
    native_time = 2 if gelu_after_gemm else 1
    return native.Measured(statistics.median(r[0] / r[native_time] for r in rounds), gelu_after_gemm)


def _encode(blocks: nn.ModuleList, x: torch.Tensor, use_native: bool) -> torch.Tensor:
    """The ViT blocks on ``x``, through the native kernels when they are wanted, apply and are chosen."""
    choice = kernel_choice() if use_native and native.applies(x) else None
    if choice is None or choice.kernels is None:
        for block in blocks:
            x = block(x)
        return x
    normed = blocks[0].norm1(x)
    for i, block in enumerate(blocks):
        following = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
        x, normed = block.forward_native(x, normed, choice.kernels, following, choice.gelu_after_gemm)
    return x


class FusedAstroMAE(nn.Module):
    """``forward(images, magnitudes) -> z``, as ``AstroMAE`` computes it; build it with
    ``from_state_dict``.

    ``precision="bf16"`` runs the image branches (ViT and Inception, 92 % of the work) under
    bfloat16 autocast and keeps the magnitude MLP and the fusion head in float32: magnitudes
    near 18 would lose their second decimal in bfloat16. ``use_native=False`` keeps the ViT
    blocks and the max-pools on torch's kernels even where ``native.kernels()`` are available.
    """

    def __init__(self, state: Weights, precision: str = "fp32", use_native: bool = True) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        w = checked_weights(state)
        self.bf16 = precision == "bf16"
        self.use_native = use_native
        # What the reference model holds, for the records (its BatchNorm statistics are buffers).
        self.reference_parameters = parameter_count({k: t.shape for k, t in w.items()})
        patch = w["patch_embed.proj.weight"]
        self.patch_embed = _conv(patch, w["patch_embed.proj.bias"], stride=patch.shape[-1])
        self.register_buffer("cls_pos", w["cls_token"] + w["pos_embed"][:, :1])
        self.register_buffer("patch_pos", w["pos_embed"][:, 1:])
        self.blocks = nn.ModuleList(FusedBlock(w, f"blocks.{i}") for i in range(DEPTH))
        self.fc_norm = _layer_norm(w, "fc_norm")
        head_w, head_b, first_w, first_b = (w[f"{k}.{p}"] for k in ("head", "vit_block.0") for p in ("weight", "bias"))
        self.vit_in = Linear(first_w @ head_w, first_w @ head_b + first_b, "relu")
        self.vit_out = _linear(w, "vit_block.2")
        seq = "inception_model.vis_inception"
        # The stem, a 1x1 convolution (an affine map of each pixel's bands), is followed by a
        # 2x2 average pool (stage 1), whose weights sum to 1: together, a 2x2 convolution of
        # stride 2 whose taps are the 1x1 weights over 4 (Inception branch 1.04-1.06x faster).
        stem_weight = (w[f"{seq}.0.weight"] / 4).expand(-1, -1, 2, 2)
        stem = _conv(stem_weight.contiguous(memory_format=torch.channels_last), w[f"{seq}.0.bias"], stride=2)
        stages: list[nn.Module] = [stem]
        for i in range(2, max(INCEPTION_BLOCKS) + 1):
            if i in INCEPTION_POOLS:
                stages.append(nn.AvgPool2d(2))
            else:
                _, width, use_5x5 = INCEPTION_BLOCKS[i]
                stages.append(FusedInception(w, f"{seq}.{i}", width, use_5x5, use_native))
        self.incept = nn.Sequential(*stages)
        first, second = INCEPTION_HEAD
        self.incept_head = nn.Sequential(
            nn.Flatten(), _linear(w, f"{seq}.{first}", "relu"), _linear(w, f"{seq}.{second}")
        )
        self.magnitude_block = _mlp(w, "inception_model.magnitude_block", MAG_LAYERS)
        self.concat_block = _mlp(w, "concat_block", 2)

    def kernels_used(self) -> tuple[str, str]:
        """Which kernels eager calls run the ViT blocks on, "native-<form>" (``native.py``) or
        "torch", and why: the native ones in float32 on the CPU, if wanted (``use_native``), built
        here and chosen (``kernel_choice``), which this call finds out if need be."""
        if not self.use_native:
            return "torch", "the model was built with use_native=False"
        if self.bf16 or self.cls_pos.device.type != "cpu":
            return "torch", "the native kernels are for float32 on the CPU"
        choice = kernel_choice()
        return choice.label, choice.reason

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.vit_features(images), self.inception_features(images), self.magnitude_block(magnitudes))

    # The stages, one method each so that ``bench kernel`` can time them apart.
    def vit_features(self, images: torch.Tensor) -> torch.Tensor:
        with self._image_precision(images):
            x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.patch_pos
            x = torch.cat((self.cls_pos.expand(x.shape[0], -1, -1), x), dim=1)
            x = _encode(self.blocks, x, self.use_native)
            return self.vit_out(self.vit_in(self.fc_norm(x[:, 1:].mean(dim=1))))

    def inception_features(self, images: torch.Tensor) -> torch.Tensor:
        with self._image_precision(images):
            return self.incept_head(self.incept(images).contiguous())

    def fusion(self, vit: torch.Tensor, incept: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        return self.concat_block(torch.cat((vit.float(), incept.float(), mag), dim=1)).squeeze(1)

    def _image_precision(self, images: torch.Tensor) -> torch.autocast:
        return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @classmethod
    def from_state_dict(cls, state: Weights, precision: str = "fp32", use_native: bool = True) -> FusedAstroMAE:
        """The fused model of these weights (keys and shapes of ``AstroMAE().state_dict()``,
        BatchNorm statistics final), in eval mode. Raises ``InputError`` for missing,
        unexpected or mis-shaped tensors."""
        with torch.no_grad():
            return cls(state, precision, use_native).eval()


def _mlp(w: Weights, name: str, layers: int) -> nn.Sequential:
    """The reference's linear layers ``name.0``, ``name.2``, ``name.4``, ... (ReLU between them)
    as one Sequential of ``Linear``s, each but the last applying the ReLU itself."""
    last = layers - 1
    return nn.Sequential(*(_linear(w, f"{name}.{2 * j}", "none" if j == last else "relu") for j in range(layers)))


def fuse(model: nn.Module, precision: str = "fp32", use_native: bool = True) -> FusedAstroMAE:
    """The fused inference form of an eval-mode reference model with final weights."""
    if model.training:
        raise ValueError("fuse() needs a model in eval mode (BatchNorm statistics are folded)")
    return FusedAstroMAE.from_state_dict(model.state_dict(), precision, use_native)
