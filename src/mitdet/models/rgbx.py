"""Dual-stream MiT for RGB+X: an RGB stream (SegFormer's encoder, unchanged), an auxiliary stream (the same variant,
its first patch embedding taking N channels) and a fusion module at each of the four stages.

`cmx` follows CMX (Liu et al., "CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers"; the
reference code is the repository huaaaliu/RGBX_Semantic_Segmentation): a Feature Rectify Module (FRM) calibrates
each stream with the other, channel- and spatial-wise, and the rectified maps feed each stream's next stage; a
Feature Fusion Module (FFM: cross-attention with efficient global context, then a channel embedding) gives the
stage's fused map to the FPN. `add` and `concat` are the plain baselines for ablation: the streams run apart and
only their maps are merged. `switch` exchanges channels between the streams by learned gates (after CEN, Wang et al.,
"Deep Multimodal Fusion by Channel Exchanging") and fuses them under a spatial attention map (CBAM's); `guided`
adds the aux map to RGB under channel and spatial attention guided by both (after GAFF, Zhang et al., "Guided
Attentive Feature Fusion for Multispectral Pedestrian Detection"). Every fused map has the RGB stream's width, so
the FPN and heads are unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mitdet.models.mit import MixVisionTransformer, _init_weights, build_mit

FUSIONS = ("cmx", "add", "concat", "switch", "guided")


# ------------------------------------------------------------------------------------- Feature Rectify Module
class ChannelWeights(nn.Module):
    """Per-channel weights for each modality from the avg- and max-pooled maps of both, through an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim * 4, dim * 4), nn.ReLU(inplace=True), nn.Linear(dim * 4, dim * 2),
                                 nn.Sigmoid())

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        b = x1.shape[0]
        x = torch.cat((x1, x2), 1)
        pooled = torch.cat((x.mean((2, 3)), x.amax((2, 3))), 1)  # [B, 4C]: avg then max, as CMX's
        w = self.mlp(pooled).reshape(b, 2, self.dim, 1, 1)
        return w[:, 0], w[:, 1]


class SpatialWeights(nn.Module):
    """Per-pixel weights for each modality from a 1x1 conv stack over the concatenated maps."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim * 2, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, 2, 1),
                                 nn.Sigmoid())

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        w = self.mlp(torch.cat((x1, x2), 1))  # [B, 2, H, W]
        return w[:, 0:1], w[:, 1:2]


class FeatureRectify(nn.Module):
    """CMX's FRM: each modality plus the other weighted by channel and by pixel (lambda 0.5 each)."""

    def __init__(self, dim: int, lambda_c: float = 0.5, lambda_s: float = 0.5):
        super().__init__()
        self.lambda_c, self.lambda_s = lambda_c, lambda_s
        self.channel_weights = ChannelWeights(dim)
        self.spatial_weights = SpatialWeights(dim)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        c1, c2 = self.channel_weights(x1, x2)
        s1, s2 = self.spatial_weights(x1, x2)
        # CMX: c1/s1 weigh x1 where it rectifies x2, and c2/s2 weigh x2 where it rectifies x1
        out1 = x1 + self.lambda_c * c2 * x2 + self.lambda_s * s2 * x2
        out2 = x2 + self.lambda_c * c1 * x1 + self.lambda_s * s1 * x1
        return out1, out2


# -------------------------------------------------------------------------------------- Feature Fusion Module
class CrossAttention(nn.Module):
    """Cross-attention with efficient global context: each modality's queries read the other's K^T V ([d, d] per
    head), linear in the number of tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv1 = nn.Linear(dim, dim * 2, bias=False)
        self.kv2 = nn.Linear(dim, dim * 2, bias=False)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = x1.shape
        heads = self.num_heads
        q1 = x1.reshape(b, n, heads, c // heads).transpose(1, 2)
        q2 = x2.reshape(b, n, heads, c // heads).transpose(1, 2)
        k1, v1 = self.kv1(x1).reshape(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        k2, v2 = self.kv2(x2).reshape(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        ctx1 = ((k1.transpose(-2, -1) @ v1) * self.scale).softmax(dim=-2)
        ctx2 = ((k2.transpose(-2, -1) @ v2) * self.scale).softmax(dim=-2)
        y1 = (q1 @ ctx2).transpose(1, 2).reshape(b, n, c)
        y2 = (q2 @ ctx1).transpose(1, 2).reshape(b, n, c)
        return y1, y2


class CrossPath(nn.Module):
    """Each modality split into a kept half and a half exchanged by cross-attention, projected back, residual."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.channel_proj1 = nn.Linear(dim, dim * 2)
        self.channel_proj2 = nn.Linear(dim, dim * 2)
        self.act = nn.ReLU()
        self.cross_attn = CrossAttention(dim, num_heads)
        self.end_proj1 = nn.Linear(dim * 2, dim)
        self.end_proj2 = nn.Linear(dim * 2, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        y1, u1 = self.act(self.channel_proj1(x1)).chunk(2, dim=-1)
        y2, u2 = self.act(self.channel_proj2(x2)).chunk(2, dim=-1)
        v1, v2 = self.cross_attn(u1, u2)
        out1 = self.norm1(x1 + self.end_proj1(torch.cat((y1, v1), -1)))
        out2 = self.norm2(x2 + self.end_proj2(torch.cat((y2, v2), -1)))
        return out1, out2


class ChannelEmbed(nn.Module):
    """The two modalities' tokens, concatenated, to one map: 1x1 conv, depthwise 3x3, 1x1, norm, plus a 1x1
    residual, normed (CMX uses BatchNorm here)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels))
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.norm(self.residual(x) + self.channel_embed(x))


class FeatureFusion(nn.Module):
    """CMX's FFM: cross path over the tokens of both modalities, then the channel embedding to one map."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.cross = CrossPath(dim, num_heads)
        self.channel_emb = ChannelEmbed(dim * 2, dim)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        _, _, h, w = x1.shape
        t1, t2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        return self.channel_emb(torch.cat((t1, t2), -1), h, w)


# ------------------------------------------------------------------------------------------ stage fusions
class CmxFusion(nn.Module):
    """FRM then FFM: (rectified RGB, rectified aux) for the next stage and the fused map for the FPN."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.frm = FeatureRectify(dim)
        self.ffm = FeatureFusion(dim, num_heads)

    def forward(self, rgb: Tensor, aux: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rgb, aux = self.frm(rgb, aux)
        return rgb, aux, self.ffm(rgb, aux)


class AddFusion(nn.Module):
    """Baseline: the sum of the two maps; the streams go on unchanged."""

    def forward(self, rgb: Tensor, aux: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return rgb, aux, rgb + aux


class ConcatFusion(nn.Module):
    """Baseline: the two maps concatenated and mixed by a 1x1 conv; the streams go on unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim * 2, dim, 1)

    def forward(self, rgb: Tensor, aux: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return rgb, aux, self.proj(torch.cat((rgb, aux), 1))


def pooled_maps(*maps: Tensor) -> Tensor:
    """Each map's channel mean and max, concatenated: [B, 2 * len(maps), H, W] (CBAM's spatial-attention input)."""
    return torch.cat([t for x in maps for t in (x.mean(1, keepdim=True), x.amax(1, keepdim=True))], 1)


class SwitchFusion(nn.Module):
    """Channel switching, then spatial attention: each stream keeps its channels by a gate from its global context
    and takes the rest from the other; the switched streams go on, their sum weighted per pixel is the fused map."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        # CEN replaces a channel whose BatchNorm scale is small by the other stream's; MiT has no BatchNorm, so the
        # differentiable form: a per-channel gate (avg pool -> 1x1 -> sigmoid) from each stream's own context
        self.gate_rgb = nn.Conv2d(dim, dim, 1)
        self.gate_aux = nn.Conv2d(dim, dim, 1)
        self.spatial = nn.Conv2d(4, 1, kernel_size, padding=kernel_size // 2)  # [mean, max] of both streams

    def forward(self, rgb: Tensor, aux: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g_rgb = self.gate_rgb(rgb.mean((2, 3), keepdim=True)).sigmoid()
        g_aux = self.gate_aux(aux.mean((2, 3), keepdim=True)).sigmoid()
        rgb, aux = g_rgb * rgb + (1 - g_rgb) * aux, g_aux * aux + (1 - g_aux) * rgb
        s = self.spatial(pooled_maps(rgb, aux)).sigmoid()
        return rgb, aux, s * (rgb + aux)


class GuidedFusion(nn.Module):
    """RGB plus the aux map under channel and spatial attention from both; the streams go on unchanged, as in GAFF
    (attention builds only the fused map): each stays a single-modality backbone, its pretrained features intact."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.channel = nn.Conv2d(dim * 2, dim, 1)
        self.spatial = nn.Conv2d(4, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, rgb: Tensor, aux: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.channel(torch.cat((rgb, aux), 1).mean((2, 3), keepdim=True)).sigmoid()
        s = self.spatial(pooled_maps(aux, rgb)).sigmoid()
        return rgb, aux, rgb + c * s * aux


def build_fusion(fusion: str, dim: int, num_heads: int) -> nn.Module:
    """One stage's fusion module `fusion` (FUSIONS) for maps of `dim` channels, with its own initialisation."""
    if fusion == "cmx":
        module = CmxFusion(dim, num_heads)
    elif fusion == "add":
        module = AddFusion()
    elif fusion == "concat":
        module = ConcatFusion(dim)
    elif fusion == "switch":
        module = SwitchFusion(dim)
    elif fusion == "guided":
        module = GuidedFusion(dim)
    else:
        raise ValueError(f"unknown model.fusion '{fusion}'; choose one of: {', '.join(FUSIONS)}")
    module.apply(_init_weights)  # CMX initialises its modules as SegFormer does (BatchNorm: ones and zeros)
    return module


# ------------------------------------------------------------------------------------------- the encoder
def run_stage(encoder: MixVisionTransformer, i: int, x: Tensor) -> Tensor:
    """Stage i (1..4) of a MiT encoder, as its own forward runs it: [B, C_in, H, W] -> [B, C_i, H', W']."""
    embed, blocks, norm = encoder.stage(i)
    x, h, w = embed(x)
    for blk in blocks:
        x = blk(x, h, w)
    return norm(x).reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


class DualMiT(nn.Module):
    """[B, 3 + N, H, W] -> four fused maps at strides 4..32, with MiT's widths (`out_channels`)."""

    def __init__(self, backbone: str, aux_channels: int, fusion: str = "cmx", drop_path_rate: float = 0.0,
                 frozen_stages: int = 0):
        super().__init__()
        if aux_channels < 1:
            raise ValueError(f"an RGB+X encoder needs at least one aux channel; got {aux_channels}")
        # built in this order so the RGB stream draws the same initial weights as build_mit under one seed
        self.rgb = build_mit(backbone, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages)
        self.aux = build_mit(backbone, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                             in_chans=aux_channels)
        cfg = self.rgb.cfg
        self.fusions = nn.ModuleList(build_fusion(fusion, d, h) for d, h in zip(cfg.embed_dims, cfg.num_heads,
                                                                                  strict=True))
        self.name, self.fusion, self.aux_channels = backbone, fusion, aux_channels
        self.out_channels = list(self.rgb.out_channels)
        self.strides = list(self.rgb.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] != 3 + self.aux_channels:
            raise ValueError(f"the RGB+X encoder takes 3 + {self.aux_channels} channels; got {x.shape[1]}")
        rgb, aux = x[:, :3], x[:, 3:]
        outs = []
        for i, fuse in enumerate(self.fusions, start=1):
            rgb, aux, fused = fuse(run_stage(self.rgb, i, rgb), run_stage(self.aux, i, aux))
            outs.append(fused)
        return outs


def build_rgbx(backbone: str, aux_channels: int, fusion: str = "cmx", drop_path_rate: float = 0.0,
               frozen_stages: int = 0) -> DualMiT:
    """The dual-stream encoder of MiT `backbone` (mit_b0..mit_b5) for 3 + `aux_channels` input channels."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown model.fusion '{fusion}'; choose one of: {', '.join(FUSIONS)}")
    return DualMiT(backbone, aux_channels, fusion, drop_path_rate, frozen_stages)

