"""An inference-only form of a loaded AstroMAE: the same function in fewer, larger kernels.

``fuse(model)`` rewrites an eval-mode ``AstroMAE`` whose weights are final:

* every BatchNorm is folded into the convolution before it;
* the three 1x1 convolutions that open an Inception block's branches (they read the same
  input) become one convolution, split afterwards, and the branch runs channels-last;
* the PCM's grouped 1x1 convolutions become batched matmuls on the patch tokens;
* the attention's q/v bias vector is built once, not on every call;
* ``head`` and the first layer of ``vit_block`` (two linear maps with nothing between them)
  become one linear map.

The plain ``AstroMAE`` stays the reference: tests check that the fused model computes the
same outputs (within float32 rounding) and the golden outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cai_hpc.model import AstroMAE, ConvBlock, InceptionBlock, PcmBlock

PRECISIONS = ("fp32", "bf16")


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups
    )
    fused.weight.data = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data = (bias - bn.running_mean) * scale + bn.bias
    return fused


def _folded(unit: ConvBlock) -> nn.Conv2d:
    return _fold_bn(unit.conv, unit.bn)


def _stack(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """Convolutions of one input, as one convolution whose outputs are theirs, concatenated."""
    first = convs[0]
    stacked = nn.Conv2d(first.in_channels, sum(c.out_channels for c in convs), first.kernel_size)
    stacked.weight.data = torch.cat([c.weight for c in convs])
    stacked.bias.data = torch.cat([c.bias for c in convs])
    return stacked


class FusedInception(nn.Module):
    def __init__(self, block: InceptionBlock) -> None:
        super().__init__()
        self.use_5x5 = block.use_5x5
        self.width = block.branch1.conv.out_channels
        reducers = [block.branch1, block.branch2[0]] + ([block.branch3[0]] if self.use_5x5 else [])
        self.reduce = _stack([_folded(u) for u in reducers])
        self.conv3 = _folded(block.branch2[1])
        self.conv5 = _folded(block.branch3[1]) if self.use_5x5 else None
        self.pool_proj = _folded(block.branch4[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = F.relu(self.reduce(x)).split(self.width, dim=1)
        outs = [reduced[0], F.relu(self.conv3(reduced[1]))]
        if self.conv5 is not None:
            outs.append(F.relu(self.conv5(reduced[2])))
        outs.append(F.relu(self.pool_proj(F.max_pool2d(x, 3, stride=1, padding=1))))
        return torch.cat(outs, dim=1)


def _group_matrices(conv: nn.Conv2d) -> torch.Tensor:
    """A grouped 1x1 convolution's weight as (groups, in per group, out per group)."""
    out_channels, in_per_group = conv.weight.shape[:2]
    return conv.weight.reshape(conv.groups, out_channels // conv.groups, in_per_group).transpose(1, 2).contiguous()


class FusedBlock(nn.Module):
    def __init__(self, block: PcmBlock) -> None:
        super().__init__()
        attn = block.attn
        self.num_heads = attn.num_heads
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.qkv_weight = attn.qkv.weight
        self.register_buffer("qkv_bias", torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias)))
        self.proj = attn.proj
        self.scale = (block.attn.qkv.in_features // self.num_heads) ** -0.5
        # The PCM's grouped 1x1 convolutions act on each patch token alone: as batched matmuls
        # over the groups, (groups, tokens, in) @ (groups, in, out), with the BatchNorm folded in.
        pcm_in = _fold_bn(block.PCM[0], block.PCM[1])
        pcm_out = block.PCM[3]
        self.groups = pcm_in.groups
        self.register_buffer("pcm_w1", _group_matrices(pcm_in))
        self.register_buffer("pcm_b1", pcm_in.bias.reshape(self.groups, 1, -1))
        self.register_buffer("pcm_w2", _group_matrices(pcm_out))
        self.register_buffer("pcm_b2", pcm_out.bias.reshape(self.groups, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        tokens = x[:, 1:].reshape(b * (n - 1), self.groups, -1).transpose(0, 1)
        hidden = F.silu(torch.baddbmm(self.pcm_b1, tokens, self.pcm_w1))
        conv = torch.baddbmm(self.pcm_b2, hidden, self.pcm_w2).transpose(0, 1).reshape(b, n - 1, c)
        qkv = F.linear(self.norm1(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # 17 tokens: plain matmuls beat the fused attention kernel's set-up cost here.
        attended = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, c))
        x = torch.cat((x[:, :1], x[:, 1:] + conv), dim=1)
        return x + self.mlp(self.norm2(x))


class FusedAstroMAE(nn.Module):
    """``forward(images, magnitudes) -> z``, as ``AstroMAE`` computes it.

    ``precision="bf16"`` runs the image branches (ViT and Inception, 92 % of the work) under
    bfloat16 autocast and keeps the magnitude MLP and the fusion head in float32: magnitudes
    near 18 would lose their second decimal in bfloat16.
    """

    def __init__(self, model: AstroMAE, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.bf16 = precision == "bf16"
        self.patch_embed = model.patch_embed
        self.register_buffer("cls_pos", (model.cls_token + model.pos_embed[:, :1]).detach())
        self.register_buffer("patch_pos", model.pos_embed[:, 1:].detach())
        self.blocks = nn.ModuleList(FusedBlock(b) for b in model.blocks)
        self.fc_norm = model.fc_norm
        head, first = model.head, model.vit_block[0]
        self.vit_in = nn.Linear(head.in_features, first.out_features)
        self.vit_in.weight.data = first.weight @ head.weight
        self.vit_in.bias.data = first.weight @ head.bias + first.bias
        self.vit_out = model.vit_block[2]
        seq = model.inception_model.vis_inception
        self.incept = nn.Sequential(
            seq[0],
            seq[1],
            FusedInception(seq[2]),
            FusedInception(seq[3]),
            seq[4],
            FusedInception(seq[5]),
            FusedInception(seq[6]),
            seq[7],
            FusedInception(seq[8]),
        )
        self.incept_head = nn.Sequential(*seq[9:])
        self.magnitude_block = model.inception_model.magnitude_block
        self.concat_block = model.concat_block

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self.patch_embed(images) + self.patch_pos
            x = torch.cat((self.cls_pos.expand(x.shape[0], -1, -1), x), dim=1)
            for block in self.blocks:
                x = block(x)
            vit = self.vit_out(F.relu(self.vit_in(self.fc_norm(x[:, 1:].mean(dim=1)))))
            incept = self.incept(images.contiguous(memory_format=torch.channels_last))
            incept = self.incept_head(incept.contiguous())
        fused = torch.cat((vit.float(), incept.float(), self.magnitude_block(magnitudes)), dim=1)
        return self.concat_block(fused).squeeze(1)


def fuse(model: AstroMAE, precision: str = "fp32") -> FusedAstroMAE:
    """The fused inference form of an eval-mode model with final weights."""
    if model.training:
        raise ValueError("fuse() needs a model in eval mode (BatchNorm statistics are folded)")
    with torch.no_grad():
        return FusedAstroMAE(model, precision).eval()
