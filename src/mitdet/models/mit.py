"""SegFormer's Mix Transformer (MiT-b0..b5) encoder: four feature maps at strides 4, 8, 16, 32.

Modules are named exactly as in NVlabs' `mix_transformer.py` (patch_embed1, block1.0.attn.q, norm1, ...), so the
original ImageNet checkpoints load with no renaming; `pretrained.py` maps Hugging Face names onto these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)
    strides: tuple[int, int, int, int] = (4, 2, 2, 2)


# The six published variants (SegFormer paper, Table 6).
MIT_CONFIGS = {
    "mit_b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}

# NVlabs builds the blocks' and stages' norms with eps=1e-6 (the ImageNet weights were trained so); the patch
# embedding and spatial-reduction norms keep LayerNorm's default 1e-5.
BLOCK_NORM_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm over tokens."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Efficient self-attention: keys and values come from a sequence shrunk sr_ratio times per side."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)  # rows [0, dim) are the keys, [dim, 2 dim) the values
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w))
            x = self.norm(x.flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as SegFormer's
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depth-wise 3x3 conv over the token grid (the Mix-FFN's positional cue)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: fc1 -> depth-wise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, in training only."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: efficient attention and Mix-FFN, each with a residual and drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """MiT encoder: `forward(x)` returns four maps [B, C_i, H/s, W/s] for s = 4, 8, 16, 32 (no classifier head)."""

    def __init__(self, cfg: MiTConfig, in_chans: int = 3, drop_path_rate: float = 0.0, frozen_stages: int = 0,
                 name: str = "mit"):
        super().__init__()
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4; got {frozen_stages}")
        self.name = name
        self.cfg = cfg
        self.frozen_stages = frozen_stages
        self.out_channels = list(cfg.embed_dims)
        self.strides = [4, 8, 16, 32]
        # deeper blocks drop more; on the CPU even when the model is built on the meta device (load without init)
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        chans = [in_chans, *cfg.embed_dims[:-1]]
        start = 0
        for i, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.depths, strict=True), start=1):
            self.add_module(f"patch_embed{i}", OverlapPatchEmbed(cfg.patch_sizes[i - 1], cfg.strides[i - 1],
                                                                 chans[i - 1], dim))
            self.add_module(f"block{i}", nn.ModuleList(
                Block(dim, cfg.num_heads[i - 1], cfg.mlp_ratio, cfg.sr_ratios[i - 1], rates[start + j])
                for j in range(depth)))
            self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            start += depth
        self.apply(_init_weights)
        self._freeze()

    def stage(self, i: int) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        """(patch embedding, blocks, norm) of stage i in 1..4."""
        return getattr(self, f"patch_embed{i}"), getattr(self, f"block{i}"), getattr(self, f"norm{i}")

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, 5):
            embed, blocks, norm = self.stage(i)
            x, h, w = embed(x)
            for blk in blocks:
                x = blk(x, h, w)
            # [B, N, C] -> [B, C, H, W] as a view: channels-last memory, which the next conv reads without a copy
            x = norm(x).reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
            outs.append(x)
        return outs

    def _freeze(self) -> None:
        for i in range(1, self.frozen_stages + 1):
            for module in self.stage(i):
                module.requires_grad_(False)
                module.eval()

    def train(self, mode: bool = True) -> "MixVisionTransformer":
        """Keep frozen stages in eval mode (their norms and drop paths) whatever the model's mode."""
        super().train(mode)
        for i in range(1, self.frozen_stages + 1):
            for module in self.stage(i):
                module.eval()
        return self


def _init_weights(m: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal linears, fan-out normal convs, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_mit(name: str, drop_path_rate: float = 0.0, frozen_stages: int = 0,
              in_chans: int = 3) -> MixVisionTransformer:
    """The MiT encoder `name` (mit_b0..mit_b5), randomly initialised as SegFormer does."""
    if name not in MIT_CONFIGS:
        raise ValueError(f"unknown backbone '{name}'; choose one of: {', '.join(MIT_CONFIGS)}")
    return MixVisionTransformer(MIT_CONFIGS[name], in_chans=in_chans, drop_path_rate=drop_path_rate,
                                frozen_stages=frozen_stages, name=name)
