"""The box head's multi-scale RoIAlign, with a CPU backward that is a few matrix products.

torchvision's CPU backward adds every gradient element into the feature map one by one, in one thread: at the
default input size that is about a fifth of a mit_b0 training step. Bilinear sampling is separable, so the
gradient one RoI sends to its feature map is Ay^T G Ax (G: its [C, 7, 7] output gradient; Ay, Ax: each bin's
summed sampling weights along y and x), two batched matrix products per image. The forward, and everything on
CUDA, in evaluation or under tracing, is torchvision's own kernel; only the sum order of the CPU gradient differs.
"""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor
from torchvision.ops import poolers


class MultiScaleRoIAlign(poolers.MultiScaleRoIAlign):
    """torchvision's pooler (the same levels and the same outputs, bit for bit) with the fast CPU backward."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = poolers._filter_input(x, self.featmap_names)
        if not _fast_backward(features[0], self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = poolers._setup_scales(features, image_shapes, self.canonical_scale,
                                                                 self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            result[idx] = _RoIAlign.apply(feature, rois[idx], scale, self.output_size, self.sampling_ratio)
        return result


def _fast_backward(feature: Tensor, sampling_ratio: int) -> bool:
    """Whether the backward below applies: a CPU float feature map that needs a gradient, a fixed sampling grid."""
    return (feature.device.type == "cpu" and feature.dtype in (torch.float32, torch.float64) and sampling_ratio > 0
            and torch.is_grad_enabled() and feature.requires_grad and not torchvision._is_tracing()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


class _RoIAlign(torch.autograd.Function):
    """torchvision's roi_align (aligned=False, as its pooler calls it) with `roi_align_backward`."""

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, scale: float, output_size: tuple[int, int], sampling_ratio: int):
        ctx.save_for_backward(rois)
        ctx.shape, ctx.scale, ctx.output_size, ctx.sampling_ratio = feature.shape, scale, output_size, sampling_ratio
        return torch.ops.torchvision.roi_align(feature, rois, scale, *output_size, sampling_ratio, False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        grad_feature = roi_align_backward(grad, rois, ctx.shape, ctx.scale, ctx.output_size, ctx.sampling_ratio)
        return grad_feature, None, None, None, None


def roi_align_backward(grad: Tensor, rois: Tensor, shape, scale: float, output_size: tuple[int, int],
                       sampling_ratio: int) -> Tensor:
    """The gradient of torchvision's `roi_align(feature, rois, output_size, scale, sampling_ratio)` (aligned=False)
    with respect to `feature` of `shape` [N, C, H, W], given the output's gradient `grad` [K, C, PH, PW]."""
    n, channels, height, width = shape
    out = grad.new_zeros((n, height, channels, width))
    if len(rois) == 0:
        return out.permute(0, 2, 1, 3)
    (ph, pw), grad = output_size, grad.contiguous()
    x0, y0 = rois[:, 1] * scale, rois[:, 2] * scale
    roi_w = (rois[:, 3] * scale - x0).clamp(min=1.0)  # torchvision's legacy (aligned=False) rules
    roi_h = (rois[:, 4] * scale - y0).clamp(min=1.0)
    ay = _axis_weights(y0, roi_h / ph, ph, sampling_ratio, height)  # [K, PH, H]
    ax = _axis_weights(x0, roi_w / pw, pw, sampling_ratio, width)  # [K, PW, W]
    image = rois[:, 0].to(torch.int64)
    for i in range(n):
        k = torch.where(image == i)[0]
        if len(k) == 0:
            continue
        # G Ax for every RoI (bins first: the small gradient is transposed, not the product), then the sum over
        # RoIs and bins of Ay^T (G Ax): one matrix product
        g = grad[k].transpose(1, 2).reshape(len(k), ph * channels, pw)
        rows = torch.bmm(g, ax[k]).view(len(k) * ph, channels * width)  # [k * PH, C * W]
        out[i] = (ay[k].reshape(len(k) * ph, height).t() @ rows).view(height, channels, width)
    return out.permute(0, 2, 1, 3).div_(sampling_ratio * sampling_ratio)


def _axis_weights(start: Tensor, bin_size: Tensor, bins: int, samples: int, size: int) -> Tensor:
    """[K, bins, size]: the summed bilinear weight of each bin's samples on each pixel along one axis, by the rules
    of torchvision's CPU kernel (a sample beyond one pixel outside the map weighs nothing; clamped at the edges)."""
    k = len(start)
    offsets = torch.arange(samples, dtype=start.dtype) + 0.5
    at = ((start[:, None, None] + torch.arange(bins, dtype=start.dtype)[None, :, None] * bin_size[:, None, None])
          + (offsets[None, None, :] * bin_size[:, None, None]) / samples)  # [K, bins, samples]
    inside = ((at >= -1.0) & (at <= size)).to(start.dtype)
    at = at.clamp(min=0)
    low = at.to(torch.int64)
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, size - 1, low + 1)
    frac = torch.where(last, torch.zeros_like(at), at - low)
    index = torch.stack([low, high], -1).reshape(k, bins, -1)
    weight = (torch.stack([1.0 - frac, frac], -1) * inside[..., None]).reshape(k, bins, -1)
    return start.new_zeros((k, bins, size)).scatter_add_(2, index, weight)
