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

import contextlib
import os
import tempfile
import threading

import albumentations as A
import cv2
import numpy as np

from mitdet.data.headers import open_regular, probe_fd
from mitdet.params import AugmentParams, ModelParams

# EXIF orientation is ignored: COCO boxes and the header sizes the index checked refer to the stored pixels
READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# What libjpeg prints (and otherwise ignores) when the entropy-coded data is damaged: the image then decodes grey
# or garbled past the damage, so it must be skipped, not trained on.
JPEG_DAMAGE = (b"Corrupt JPEG data", b"Premature end of JPEG file", b"Inconsistent progression sequence")
_stderr_lock = threading.Lock()
_capture: tuple[int, int] | None = None  # (pid, fd)


def decode_image(path: str, width: int | None = None, height: int | None = None) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8 RGB, "") or (None, why it cannot be used): not a regular file, a header other than
    `width` x `height` (checked before decoding, so no absurd allocation), a decoder error, damaged JPEG data."""
    fd, reason = open_regular(path)
    if fd is None:
        return None, reason.replace("_", " ")
    try:
        size = os.fstat(fd).st_size
        w, h, reason = probe_fd(fd, size)
        if reason:
            return None, reason.replace("_", " ")
        if width is not None and (w, h) != (width, height):
            return None, f"is {w}x{h}, the index says {width}x{height}"
        with os.fdopen(os.dup(fd), "rb") as f:  # (read() loops where one pread stops at 2 GB)
            data = f.read()
    finally:
        os.close(fd)
    try:
        with _libjpeg_messages() as messages:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), READ_FLAGS)
    except (cv2.error, MemoryError) as err:
        return None, f"cannot be decoded ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:120]})"
    damage = [line for line in messages if line.startswith(JPEG_DAMAGE)]
    if damage:
        return None, f"holds damaged JPEG data ({damage[0].decode(errors='replace')})"
    if image is None:
        return None, "cannot be decoded"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), ""


@contextlib.contextmanager
def _libjpeg_messages():
    """Collect what the decoder writes to file descriptor 2 (libjpeg's only way to report damaged data) into the
    yielded list of lines; lines that are not libjpeg's damage reports go on to the real stderr."""
    lines: list[bytes] = []
    with _stderr_lock:
        capture = _capture_file()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to collect
            yield lines
            return
        os.dup2(capture, 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            written = os.lseek(capture, 0, os.SEEK_CUR)
            text = os.pread(capture, written, 0) if written else b""
            os.ftruncate(capture, 0)
            os.lseek(capture, 0, os.SEEK_SET)
            lines.extend(text.splitlines())
            other = b"".join(line + b"\n" for line in lines if not line.startswith(JPEG_DAMAGE))
            if other:
                os.write(2, other)


def _capture_file() -> int:
    """This process's scratch file for `_libjpeg_messages` (a fork gets its own: a shared offset would mix them)."""
    global _capture
    if _capture is None or _capture[0] != os.getpid():
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("mitdet-decode", os.MFD_CLOEXEC)
        else:
            fd, name = tempfile.mkstemp(prefix="mitdet-decode-")
            os.unlink(name)
        _capture = (os.getpid(), fd)
    return _capture[1]


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
