"""AstroMAE photometric-redshift regressor (``ViT_Astro`` of the reference), rebuilt.

Three branches meet in a small fusion head:

* a pcm-ViT encoder over the 4x4 grid of 8x8 patches of the 5-band image, whose blocks
  run a parallel 1x1 convolution module (PCM) on the token map beside attention;
* an Inception CNN over the same image;
* an MLP over the five ugriz magnitudes.

Module and parameter names follow the reference so that its ``state_dict`` loads with
``strict=True``; ``inception_model.conv2d_init`` and ``inception_model.vis_inception.0`` are
one module registered twice, exactly as in the reference. The sizes, and the weights' names
and shapes, are in ``layout.py``; inference runs the fused form (``fast.py``), built from the
weights without this module or timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch import nn

from cai_hpc.layout import BANDS, BRANCH_DIM, DEPTH, EMBED_DIM, HEADS, IMAGE_SIZE, MAG_DIM, MLP_RATIO, PATCH, PCM_GROUPS


class Attention(nn.Module):
    """Multi-head self-attention with a bias on q and v only (the MAE/BEiT convention)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PcmBlock(nn.Module):
    """Transformer block with a parallel convolution module on the patch-token map.

    The PCM sees the block's input tokens (not the normalised ones) laid out as a square
    map, and its output is added to the patch tokens after the attention residual; the
    class token only goes through attention and the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, groups: int) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU)
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, groups=groups),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, dim, 1, groups=groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = int((n - 1) ** 0.5)
        token_map = x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        conv = self.PCM(token_map).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = torch.cat((x[:, :1], x[:, 1:] + conv), dim=1)
        return x + self.mlp(self.norm2(x))


class ConvBlock(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, the unit of every Inception branch."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches of equal width, concatenated on channels.

    ``use_5x5=False`` reproduces the reference's last block, which builds its 5x5 branch
    (so the weights exist in the checkpoint) but leaves it out of the forward pass.
    """

    def __init__(self, cin: int, width: int, use_5x5: bool = True) -> None:
        super().__init__()
        self.use_5x5 = use_5x5
        self.branch1 = ConvBlock(cin, width, 1)
        self.branch2 = nn.Sequential(ConvBlock(cin, width, 1), ConvBlock(width, width, 3))
        self.branch3 = nn.Sequential(ConvBlock(cin, width, 1), ConvBlock(width, width, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBlock(cin, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1, self.branch2, self.branch3, self.branch4]
        if not self.use_5x5:
            del branches[2]
        return torch.cat([branch(x) for branch in branches], dim=1)


class InceptionMagnitude(nn.Module):
    """The reference's ``Input_Mix_Model``: Inception CNN on images, MLP on magnitudes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d_init = nn.Conv2d(BANDS, 32, 1)
        self.vis_inception = nn.Sequential(
            self.conv2d_init,
            nn.AvgPool2d(2),
            InceptionBlock(32, 16),
            InceptionBlock(64, 16),
            nn.AvgPool2d(2),
            InceptionBlock(64, 8),
            InceptionBlock(32, 8),
            nn.AvgPool2d(2),
            InceptionBlock(32, 4, use_5x5=False),
            nn.Flatten(),
            nn.Linear(EMBED_DIM, BRANCH_DIM),
            nn.ReLU(),
            nn.Linear(BRANCH_DIM, BRANCH_DIM),
        )
        layers: list[nn.Module] = [nn.Linear(BANDS, MAG_DIM)]
        for _ in range(4):
            layers += [nn.ReLU(), nn.Linear(MAG_DIM, MAG_DIM)]
        self.magnitude_block = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.vis_inception(images), self.magnitude_block(magnitudes)), dim=1)


class AstroMAE(nn.Module):
    """The AstroMAE regressor: ``forward(images (B,5,32,32), magnitudes (B,5)) -> z (B,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(IMAGE_SIZE, PATCH, BANDS, EMBED_DIM)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        # Stored, never recomputed: a checkpoint's position embedding is what it was trained with.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, EMBED_DIM))
        self.blocks = nn.ModuleList(PcmBlock(EMBED_DIM, HEADS, MLP_RATIO, PCM_GROUPS) for _ in range(DEPTH))
        self.fc_norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.head = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.vit_block = nn.Sequential(nn.Linear(EMBED_DIM, BRANCH_DIM), nn.ReLU(), nn.Linear(BRANCH_DIM, BRANCH_DIM))
        self.inception_model = InceptionMagnitude()
        self.concat_block = nn.Sequential(nn.Linear(2 * BRANCH_DIM + MAG_DIM, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """ViT branch: mean of the patch tokens after the encoder, normalised and projected."""
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.vit_block(self.head(self.fc_norm(x[:, 1:].mean(dim=1))))

    def forward_head(self, vit: torch.Tensor, inception_mag: torch.Tensor) -> torch.Tensor:
        return self.concat_block(torch.cat((vit, inception_mag), dim=1)).squeeze(1)

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images), self.inception_model(images, magnitudes))


def parameter_count(model: nn.Module) -> int:
    """Trainable-parameter count, each shared module counted once (15,902,889 for AstroMAE)."""
    return sum(p.numel() for p in model.parameters())
