"""Albumentations pipelines: aspect-preserving resize, horizontal flip, optional colour jitter and multi-scale.

Every random draw comes from a generator seeded by (seed, epoch, sample index), so a resumed run and any number
of DataLoader workers produce exactly the augmentations of an uninterrupted run.

Why the pipeline is reseeded per sample: albumentations (2.0.8) `Compose` keeps its own random generators, apart
from Python's, NumPy's and torch's, so the usual global seeding does not reach it:
- with global seeds set and `Compose(seed=None)`, two runs augment differently;
- with a fixed `Compose(seed=...)`, every DataLoader worker draws the same augmentations, and a usual
  `worker_init_fn` that seeds random/NumPy/torch does not change that;
- a process restarted at epoch 2 starts the generators afresh and replays epoch 0's augmentations.
Exact resume therefore needs the transform reseeded from (seed, epoch, sample index) before every sample.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from mitdet.params import AugmentParams, ModelParams


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """(new_h, new_w, scale): shorter side to `min_size` unless the longer would pass `max_size` (torchvision's
    rule)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


class DetectionTransform:
    """image (HxWx3 uint8 RGB), boxes (N,4 xyxy float) -> resized/augmented image, boxes, and the scale used."""

    def __init__(self, model: ModelParams, augment: AugmentParams | None = None, seed: int = 0):
        self.min_size, self.max_size = model.min_size, model.max_size
        self.augment = augment
        self.seed = seed
        self.scales = list(augment.multi_scale) if augment and augment.multi_scale else [model.min_size]
        aug = []
        if augment is not None and augment.hflip > 0:
            aug.append(A.HorizontalFlip(p=augment.hflip))
        if augment is not None and augment.color_jitter > 0:
            s = augment.color_jitter
            aug.append(A.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=0.1 * s, p=0.8))
        self.pipeline = A.Compose(aug, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                                clip=True, min_area=0.0, min_visibility=0.0),
                                  seed=seed) if aug else None
        self._resizers: dict[tuple[int, int], A.Compose] = {}  # deterministic, so built once per output size

    def _resizer(self, nh: int, nw: int) -> A.Compose:
        resize = self._resizers.get((nh, nw))
        if resize is None:
            if len(self._resizers) >= 512:  # COCO has thousands of sizes: bound the cache
                self._resizers.clear()
            resize = self._resizers[nh, nw] = A.Compose(
                [A.Resize(nh, nw, interpolation=cv2.INTER_LINEAR)],
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True))
        return resize

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, epoch: int = 0, index: int = 0):
        rng = np.random.default_rng([self.seed, epoch, index])
        min_size = self.scales[int(rng.integers(len(self.scales)))] if len(self.scales) > 1 else self.scales[0]
        h, w = image.shape[:2]
        nh, nw, scale = resized_shape(h, w, min_size, self.max_size)
        out = self._resizer(nh, nw)(image=image, bboxes=boxes.reshape(-1, 4), labels=labels)
        if self.pipeline is not None:
            # reseed from (seed, epoch, index): Compose's own generators ignore global seeds (module docstring)
            self.pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
            out = self.pipeline(image=out["image"], bboxes=out["bboxes"], labels=out["labels"])
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        return out["image"], boxes, np.asarray(out["labels"], np.int64), scale


def build_transform(model: ModelParams, augment: AugmentParams | None, seed: int) -> DetectionTransform:
    """The training transform (with `augment`) or, with augment=None, the evaluation one (resize only)."""
    return DetectionTransform(model, augment, seed)
