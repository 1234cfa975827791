"""torchvision Faster R-CNN + FPN over a MiT encoder, every setting taken from `params.model`."""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mitdet.models.mit import build_mit
from mitdet.models.pretrained import is_detector_folder, load_pretrained, load_pretrained_rgbx, pretrained_for
from mitdet.models.rgbx import build_rgbx
from mitdet.models.roi_align import MultiScaleRoIAlign
from mitdet.params import ModelParams

# MiT was pretrained on ImageNet with these (SegFormer's convention); inputs are RGB in 0..1.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class BackboneWithFPN(nn.Module):
    """An encoder giving four maps (strides 4..32) + torchvision's FPN with a max-pool level: '0'..'3', 'pool'."""

    def __init__(self, body: nn.Module, fpn_channels: int, channels_last: bool = False):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class DetectorTransform(GeneralizedRCNNTransform):
    """torchvision's resize + ImageNet normalisation: shorter side drawn from `train_min_sizes` in training,
    `test_min_size` in eval (torchvision alone would test at the last training size).

    An image already at one of the allowed sizes (as mitdet's loader delivers it, seeded multi-scale included) is
    kept as it is: no second interpolation, and no second random size draw.
    """

    def __init__(self, train_min_sizes: tuple[int, ...], test_min_size: int, max_size: int,
                 image_mean: list[float] = IMAGENET_MEAN, image_std: list[float] = IMAGENET_STD):
        super().__init__(tuple(train_min_sizes), max_size, list(image_mean), list(image_std))
        self.train_min_sizes = tuple(train_min_sizes)
        self.test_min_size = test_min_size

    def train(self, mode: bool = True) -> "DetectorTransform":
        super().train(mode)
        self.min_size = self.train_min_sizes if mode else (self.test_min_size,)
        return self

    def resize(self, image: Tensor, target=None):
        height, width = image.shape[-2:]
        for size in self.min_size:
            scale = min(size / min(height, width), self.max_size / max(height, width))
            if (round(height * scale), round(width * scale)) == (height, width):
                return image, target
        return super().resize(image, target)


def build_backbone(backbone: str, model: ModelParams, aux_channels: int = 0) -> BackboneWithFPN:
    """The MiT encoder (encoder weights loaded when `model.pretrained` names them) under an FPN; with modality
    rgbx the dual-stream encoder of models/rgbx.py, both streams from the same checkpoint."""
    if model.modality == "rgbx":
        encoder = build_rgbx(backbone, aux_channels, model.fusion, drop_path_rate=model.drop_path_rate,
                             frozen_stages=model.frozen_stages)
    else:
        encoder = build_mit(backbone, drop_path_rate=model.drop_path_rate, frozen_stages=model.frozen_stages)
    source = pretrained_for(model.pretrained, backbone) if model.pretrained else None
    if source and not is_detector_folder(source):  # a trained detector is loaded whole, once it is built
        if model.modality == "rgbx":
            load_pretrained_rgbx(encoder.rgb, encoder.aux, source)
        else:
            load_pretrained(encoder, source)
    return BackboneWithFPN(encoder, model.fpn_channels, channels_last=model.channels_last)


def input_normalisation(model: ModelParams, aux_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of the detector input: ImageNet's for RGB, then model.aux_mean/aux_std for rgbx
    (a single value repeated over the aux channels)."""
    if model.modality != "rgbx":
        if aux_channels:
            raise ValueError(f"model.modality rgb takes no aux channels; got aux_channels {aux_channels}")
        return IMAGENET_MEAN, IMAGENET_STD
    if aux_channels < 1:
        raise ValueError("model.modality rgbx needs aux images: aux_channels must be at least 1 (index.aux_channels)")
    stats = []
    for key in ("aux_mean", "aux_std"):
        values = list(getattr(model, key))
        if len(values) not in (1, aux_channels):
            raise ValueError(f"model.{key} needs 1 or {aux_channels} values (one per aux channel); got {values}")
        stats.append(values * aux_channels if len(values) == 1 else values)
    return IMAGENET_MEAN + stats[0], IMAGENET_STD + stats[1]


def build_detector(backbone: str, num_classes: int, model: ModelParams,
                   train_min_sizes: tuple[int, ...] | None = None, aux_channels: int = 0) -> FasterRCNN:
    """Faster R-CNN on MiT `backbone`; `num_classes` includes background (K + 1). With model.modality rgbx the
    input is [3 + aux_channels, H, W] (RGB, then the aux image), fused in a dual-stream encoder."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be at least 2; got {num_classes}")
    mean, std = input_normalisation(model, aux_channels)
    body = build_backbone(backbone, model, aux_channels)
    levels = len(body.body.out_channels) + 1  # P2..P5 and the max-pool P6
    if len(model.anchor_sizes) != levels:
        raise ValueError(f"model.anchor_sizes needs {levels} sizes (one per FPN level); got {model.anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((s,) for s in model.anchor_sizes),
                              aspect_ratios=(tuple(model.aspect_ratios),) * levels)
    rpn, roi = model.rpn, model.roi
    box_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(model.fpn_channels * 7 * 7, roi.representation_size)
    detector = FasterRCNN(
        body, None,
        min_size=model.min_size, max_size=model.max_size, image_mean=mean, image_std=std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train, rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.fg_iou_thresh, rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=box_pool, box_head=box_head,
        box_predictor=FastRCNNPredictor(roi.representation_size, num_classes),
        box_score_thresh=roi.score_thresh, box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh, box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image, box_positive_fraction=roi.positive_fraction,
    )
    detector.transform = DetectorTransform(train_min_sizes or (model.min_size,), model.min_size, model.max_size,
                                           mean, std)
    if model.channels_last:
        detector = detector.to(memory_format=torch.channels_last)
    if model.compile:
        # in place, so state_dict keys stay those of the plain model; the heads' data-dependent shapes stay eager
        detector.backbone.compile(dynamic=True)
    return detector


def set_inference(detector: FasterRCNN, model: ModelParams) -> None:
    """Apply `model`'s inference-only settings (the RPN's test-time top-n, box score, NMS and count) in place."""
    detector.rpn._pre_nms_top_n["testing"] = model.rpn.pre_nms_top_n_test
    detector.rpn._post_nms_top_n["testing"] = model.rpn.post_nms_top_n_test
    detector.roi_heads.score_thresh = model.roi.score_thresh
    detector.roi_heads.nms_thresh = model.roi.nms_thresh
    detector.roi_heads.detections_per_img = model.roi.detections_per_img


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _input_size(model: FasterRCNN, height: int, width: int):
    """Make the detector's transform keep a height x width image at its size (it resizes to min_size otherwise)."""
    t = model.transform
    saved = (t.min_size, t.max_size)
    t.min_size, t.max_size = (min(height, width),), max(height, width)
    try:
        yield
    finally:
        t.min_size, t.max_size = saved


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU's fused attention kernel, which torch's counter does not list (GPU kernels it does)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def detector_gflops(model: FasterRCNN, height: int, width: int) -> float:
    """GFLOPs (2 x multiply-adds / 1e9) of one eval-mode forward on a height x width image (of 3 + N channels
    for an RGB+X model).

    Counted by torch.utils.flop_counter: convolutions, linear layers and matrix products, and attention
    (CPU's fused SDPA kernel added here); not counted: norms, activations, RoIAlign, NMS, resizing.
    """
    was_training = model.training
    param = next(model.parameters())
    channels = len(model.transform.image_mean)  # 3, or 3 + N for RGB+X
    image = torch.rand(channels, height, width, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops})
    model.eval()
    try:
        with _input_size(model, height, width), torch.no_grad(), counter:
            model([image])
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
