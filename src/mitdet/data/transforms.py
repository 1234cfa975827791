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

RGB+X: an aligned auxiliary image (HxWxN uint8/uint16) gets the same resize and flip as the RGB image (it rides
along as albumentations' `mask`, which geometric transforms move and photometric ones leave alone).

Reduced decoding (training only): a JPEG at least 2x the drawn output size in both sides is decoded at 1/2, 1/4 or 1/8 size by
libjpeg's DCT scaling (much cheaper than a full decode), then resized; boxes are scaled from the original size.
Smaller images (the synthetic default, 128-192 px to 160/256) take the full decode, bitwise as before.
Evaluation decodes whole: its predictions match those of an exported graph fed the full image.
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from mitdet.data.decode import (JPEG_DAMAGE, READ_FLAGS, REDUCED_FLAGS, decode_array, decode_aux,  # noqa: F401
                                decode_image)  # (re-exported: others import the decoders from here)
from mitdet.params import AugmentParams, ModelParams


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """(new_h, new_w, scale): shorter side to `min_size` unless the longer would pass `max_size` (torchvision's
    rule)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


class DetectionTransform:
    """image (HxWx3 uint8 RGB), boxes (N,4 xyxy float) [, aux HxWxN] -> resized/augmented image, boxes, labels,
    scale [, aux]; `use_aux` (model.modality rgbx) tells the dataset to load the auxiliary images. The image (and
    aux) returned may be a flipped view of a resized array: `np.ascontiguousarray` it before a cv2 call."""

    def __init__(self, model: ModelParams, augment: AugmentParams | None = None, seed: int = 0):
        self.min_size, self.max_size = model.min_size, model.max_size
        self.augment = augment
        self.seed = seed
        self.use_aux = getattr(model, "modality", "rgb") == "rgbx"
        # training decodes large JPEGs at reduced size (module docstring); evaluation and `mitdet predict` decode
        # them whole, as an exported graph given the full image does, so their predictions agree
        self.reduce_jpeg = augment is not None
        self.scales = list(augment.multi_scale) if augment and augment.multi_scale else [model.min_size]
        self.hflip = float(augment.hflip) if augment is not None else 0.0
        self.pipeline = None  # albumentations, only for colour jitter (resize and flip are done here, module doc)
        if augment is not None and augment.color_jitter > 0:
            s = augment.color_jitter
            aug = [A.HorizontalFlip(p=augment.hflip)] if augment.hflip > 0 else []
            aug.append(A.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=0.1 * s, p=0.8))
            self.pipeline = A.Compose(aug, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                                    clip=True, min_area=0.0, min_visibility=0.0),
                                      seed=seed)
        self._last_draw: tuple | None = None  # (key, draw): reduction() and __call__ share one sample's draw

    def _draw(self, height: int, width: int, epoch: int, index: int):
        """(generator, new_h, new_w, scale) of sample `index` in `epoch`: the multi-scale size is its first draw."""
        key = (height, width, epoch, index)
        if self._last_draw is not None and self._last_draw[0] == key:
            draw, self._last_draw = self._last_draw[1], None  # the generator is handed out once, unused
            return draw
        rng = np.random.default_rng([self.seed, epoch, index])
        min_size = self.scales[int(rng.integers(len(self.scales)))] if len(self.scales) > 1 else self.scales[0]
        return (rng, *resized_shape(height, width, min_size, self.max_size))

    def reduction(self, height: int, width: int, epoch: int = 0, index: int = 0) -> int:
        """The JPEG decode reduction (1, 2, 4 or 8) for this sample: the largest that leaves both sides at least
        the output size."""
        if not self.reduce_jpeg:
            return 1
        draw = self._draw(height, width, epoch, index)
        self._last_draw = ((height, width, epoch, index), draw)
        _, nh, nw, _ = draw
        return next((f for f in (8, 4, 2) if height >= f * nh and width >= f * nw), 1)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, epoch: int = 0, index: int = 0,
                 aux: np.ndarray | None = None, orig: tuple[int, int] | None = None):
        """`orig`: the (height, width) the boxes refer to, when `image` was decoded at reduced size."""
        h, w = orig or image.shape[:2]
        rng, nh, nw, scale = self._draw(h, w, epoch, index)
        image = _resize(image, nh, nw)
        boxes, labels = albu_boxes(boxes.reshape(-1, 4), labels, (h, w), (nh, nw))
        if aux is not None:
            aux = _resize(aux, nh, nw)
        if self.pipeline is not None:
            # reseed from (seed, epoch, index): Compose's own generators ignore global seeds (module docstring)
            self.pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
            out = self.pipeline(image=image, bboxes=boxes, labels=labels, **({} if aux is None else {"mask": aux}))
            image, boxes, labels = out["image"], out["bboxes"], out["labels"]
            aux = None if aux is None else _channels_last(out["mask"])
        elif self.hflip > 0:
            # A.HorizontalFlip(p) in a Compose reseeded as above: it flips when its own random.Random(seed)'s first
            # draw is below p (no draw at p >= 1); its boxes go through the same round trip either way
            seed = int(rng.integers(2**31 - 1))
            flip = self.hflip >= 1 or random.Random(seed).random() < self.hflip
            boxes, labels = albu_boxes(boxes, labels, (nh, nw), (nh, nw), flip=flip)
            if flip:
                image = image[:, ::-1]
                aux = None if aux is None else aux[:, ::-1]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        result = image, boxes, np.asarray(labels, np.int64), scale
        return result if aux is None else (*result, aux)


def _resize(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """cv2 bilinear resize to nh x nw (what albumentations' Resize does, bit for bit), keeping the channel axis."""
    if image.shape[:2] == (nh, nw):
        return image
    return _channels_last(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR))


def _channels_last(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def albu_boxes(boxes: np.ndarray, labels, shape: tuple[int, int], out_shape: tuple[int, int],
               flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, labels) as an albumentations 2.0.8 Compose with BboxParams(pascal_voc, clip=True) gives them for a
    geometric transform from `shape` (h, w) to `out_shape` (Resize; with `flip`, HorizontalFlip), bit for bit
    (signed zeros included): float32 boxes normalised by the input size in float64, clipped to 0..1 (float32);
    the transform on the normalised float32 values (a resize leaves them; a flip is 1 - x); then the filter after
    the transform and the final one, each dropping boxes under 1e-7 px^2 (area from the normalised box, in its
    dtype) and a float64 denormalise-clip-normalise; then denormalised."""
    (h, w), (nh, nw) = shape, out_shape
    norm = (np.asarray(boxes, np.float32).astype(float) / np.array([w, h, w, h], dtype=float)).astype(np.float32)
    np.clip(norm, 0, 1, out=norm)
    if flip:
        norm = norm[:, [2, 1, 0, 3]]
        norm[:, 0::2] = 1 - norm[:, 0::2]
    labels = np.asarray(labels)
    size = np.array([nw, nh, nw, nh], dtype=float)
    for _ in range(2):
        keep = ((norm[:, 2] - norm[:, 0]) * nw) * ((norm[:, 3] - norm[:, 1]) * nh) >= 1e-7
        px = norm * size
        np.clip(px[:, 0::2], 0, nw, out=px[:, 0::2])  # scalar bounds, as albumentations (they keep -0.0)
        np.clip(px[:, 1::2], 0, nh, out=px[:, 1::2])
        norm = np.divide(px, size, out=px)
        if not keep.all():
            norm, labels = norm[keep], labels[keep]
    return norm * size, labels


def build_transform(model: ModelParams, augment: AugmentParams | None, seed: int) -> DetectionTransform:
    """The training transform (with `augment`) or, with augment=None, the evaluation one (resize only)."""
    return DetectionTransform(model, augment, seed)
