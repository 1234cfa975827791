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

Reduced decoding: a JPEG at least 2x the drawn output size in both sides is decoded at 1/2, 1/4 or 1/8 size by
libjpeg's DCT scaling (much cheaper than a full decode), then resized; boxes are scaled from the original size.
Smaller images (the synthetic default, 128-192 px to 160/256) take the full decode, bitwise as before.
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
REDUCED_FLAGS = {f: flag | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in
                 ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}
# What libjpeg prints (and otherwise ignores) when the entropy-coded data is damaged: the image then decodes grey
# or garbled past the damage, so it must be skipped, not trained on.
JPEG_DAMAGE = (b"Corrupt JPEG data", b"Premature end of JPEG file", b"Inconsistent progression sequence")
_stderr_lock = threading.Lock()
_capture: tuple[int, int] | None = None  # (pid, fd)


def decode_image(path: str, width: int | None = None, height: int | None = None,
                 reduce: int = 1) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8 RGB, "") or (None, why it cannot be used): not a regular file, a header other than
    `width` x `height` (checked before decoding), a decoder error, damaged JPEG data. `reduce` 2/4/8: a JPEG
    decodes at ceil(side / reduce) (DCT scaling); other formats ignore it."""
    if path.endswith(".npy"):
        array, why = decode_array(path, width, height)
        if array is not None and (array.shape[2] < 3 or array.dtype != np.uint8):
            array, why = None, f"holds {array.dtype} x {array.shape[2]} channels; its RGB needs uint8 x >= 3"
        return (None, why) if array is None else (np.ascontiguousarray(array[:, :, :3]), "")
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
            flags = REDUCED_FLAGS[reduce] if reduce > 1 and data[:3] == b"\xff\xd8\xff" else READ_FLAGS
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except (cv2.error, MemoryError) as err:
        return None, f"cannot be decoded ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:120]})"
    damage = [line for line in messages if line.startswith(JPEG_DAMAGE)]
    if damage:
        return None, f"holds damaged JPEG data ({damage[0].decode(errors='replace')})"
    if image is None:
        return None, "cannot be decoded"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), ""


def decode_array(path: str, width: int | None = None, height: int | None = None) -> tuple[np.ndarray | None, str]:
    """(HxWxC uint8/uint16 memory-mapped array, "") of a `.npy` file, or (None, why it cannot be used)."""
    fd, reason = open_regular(path)
    if fd is None:
        return None, reason.replace("_", " ")
    os.close(fd)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return None, f"cannot be read as .npy ({type(err).__name__}: {str(err)[:120]})"
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.dtype not in (np.uint8, np.uint16):
        return None, f"holds a {array.dtype} array of shape {array.shape}; expected (H, W[, C]) uint8 or uint16"
    if width is not None and (array.shape[1], array.shape[0]) != (width, height):
        return None, f"is {array.shape[1]}x{array.shape[0]}, the index says {width}x{height}"
    return array, ""


def decode_aux(path: str, width: int, height: int, channels: int = 0) -> tuple[np.ndarray | None, str]:
    """(HxWxN uint8/uint16 auxiliary image in the file's channel order, "") of a PNG or `.npy`, or (None, why):
    a size other than `width` x `height`, or a channel count other than `channels` (0: any)."""
    if path.endswith(".npy"):
        aux, why = decode_array(path, width, height)
    else:
        aux, why = _decode_png(path)
    if aux is None:
        return None, why
    if (aux.shape[1], aux.shape[0]) != (width, height):
        return None, f"is {aux.shape[1]}x{aux.shape[0]}, the image is {width}x{height}"
    if channels and aux.shape[2] != channels:
        return None, f"has {aux.shape[2]} channels, the index says {channels}"
    return aux, ""


def _decode_png(path: str) -> tuple[np.ndarray | None, str]:
    """A PNG at its own bit depth, HxWxN in the file's channel order (cv2 gives BGR(A), and BGRA for gray+alpha)."""
    fd, reason = open_regular(path)
    if fd is None:
        return None, reason.replace("_", " ")
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26:
        return None, "is not a PNG (auxiliary images are PNG or .npy)"
    try:
        aux = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (cv2.error, MemoryError) as err:
        return None, f"cannot be decoded ({type(err).__name__})"
    if aux is None:
        return None, "cannot be decoded"
    if aux.ndim == 2:
        return aux[:, :, None], ""
    color_type = data[25]  # IHDR is the first chunk: 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA
    if color_type == 4:
        return np.ascontiguousarray(aux[:, :, [0, 3]]), ""
    order = [2, 1, 0, 3] if aux.shape[2] == 4 and color_type != 3 else [2, 1, 0]
    return np.ascontiguousarray(aux[:, :, order]), ""


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
    """image (HxWx3 uint8 RGB), boxes (N,4 xyxy float) [, aux HxWxN] -> resized/augmented image, boxes, labels,
    scale [, aux]; `use_aux` (model.modality rgbx) tells the dataset to load the auxiliary images."""

    def __init__(self, model: ModelParams, augment: AugmentParams | None = None, seed: int = 0):
        self.min_size, self.max_size = model.min_size, model.max_size
        self.augment = augment
        self.seed = seed
        self.use_aux = getattr(model, "modality", "rgb") == "rgbx"
        self.reduce_jpeg = True  # decode large JPEGs at reduced size (module docstring); off: always full size
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

    def _draw(self, height: int, width: int, epoch: int, index: int):
        """(generator, new_h, new_w, scale) of sample `index` in `epoch`: the multi-scale size is its first draw."""
        rng = np.random.default_rng([self.seed, epoch, index])
        min_size = self.scales[int(rng.integers(len(self.scales)))] if len(self.scales) > 1 else self.scales[0]
        return (rng, *resized_shape(height, width, min_size, self.max_size))

    def reduction(self, height: int, width: int, epoch: int = 0, index: int = 0) -> int:
        """The JPEG decode reduction (1, 2, 4 or 8) for this sample: the largest that leaves both sides at least
        the output size."""
        if not self.reduce_jpeg:
            return 1
        _, nh, nw, _ = self._draw(height, width, epoch, index)
        return next((f for f in (8, 4, 2) if height >= f * nh and width >= f * nw), 1)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, epoch: int = 0, index: int = 0,
                 aux: np.ndarray | None = None, orig: tuple[int, int] | None = None):
        """`orig`: the (height, width) the boxes refer to, when `image` was decoded at reduced size."""
        h, w = orig or image.shape[:2]
        rng, nh, nw, scale = self._draw(h, w, epoch, index)
        if orig is None or tuple(orig) == image.shape[:2]:
            out = self._resizer(nh, nw)(image=image, bboxes=boxes.reshape(-1, 4), labels=labels)
        else:
            out = _resize_reduced(image, boxes.reshape(-1, 4), labels, (h, w), (nh, nw))
        extra = {} if aux is None else {"mask": _resize(aux, nh, nw)}
        if self.pipeline is not None:
            # reseed from (seed, epoch, index): Compose's own generators ignore global seeds (module docstring)
            self.pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
            out = self.pipeline(image=out["image"], bboxes=out["bboxes"], labels=out["labels"], **extra)
        else:
            out.update(extra)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        result = out["image"], boxes, np.asarray(out["labels"], np.int64), scale
        return result if aux is None else (*result, _channels_last(out["mask"]))


def _resize(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """cv2 bilinear resize to nh x nw (as albumentations' Resize does), keeping the channel axis."""
    if image.shape[:2] == (nh, nw):
        return image
    return _channels_last(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR))


def _channels_last(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def _resize_reduced(image, boxes, labels, orig: tuple[int, int], new: tuple[int, int]) -> dict:
    """The resizer's output for an image decoded at reduced size: its pixels resized to `new`, its boxes computed
    from the `orig` size by albumentations' own arithmetic, bit for bit (float32 normalised, clipped; then the
    filter after the transform and the final one, each a float64 denormalise-clip-normalise; then scaled)."""
    (h, w), (nh, nw) = orig, new
    norm = boxes.astype(np.float32)
    norm[:, [0, 2]] = norm[:, [0, 2]].astype(float) / w
    norm[:, [1, 3]] = norm[:, [1, 3]].astype(float) / h
    norm = np.clip(norm, 0, 1).astype(float)
    size = np.array([nw, nh, nw, nh], dtype=float)
    for _ in range(2):
        px = norm * size
        keep = (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1]) >= 1e-7
        norm = (np.clip(px, 0, size) / size)[keep]
        labels = np.asarray(labels)[keep]
    return {"image": cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR), "bboxes": norm * size,
            "labels": labels}


def build_transform(model: ModelParams, augment: AugmentParams | None, seed: int) -> DetectionTransform:
    """The training transform (with `augment`) or, with augment=None, the evaluation one (resize only)."""
    return DetectionTransform(model, augment, seed)
