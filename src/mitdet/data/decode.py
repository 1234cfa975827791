"""Image decoding for the loader: JPEG/PNG/.npy to RGB uint8 (and auxiliary images at their own depth), with
every reason a file cannot be used named instead of a crash or silently garbled pixels.

Reduced decoding: `decode_image(..., reduce=2/4/8)` decodes a JPEG at ceil(side / reduce) by libjpeg's DCT scaling
(much cheaper than a full decode); other formats ignore it.

Damaged JPEG data: libjpeg reports it only as a warning on file descriptor 2 and decodes the rest grey or garbled,
so each decode runs with fd 2 pointed at a per-process scratch file and the damage lines are looked for there.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading

import cv2
import numpy as np

from mitdet.data.headers import open_regular, probe_fd

# EXIF orientation is ignored: COCO boxes and the header sizes the index checked refer to the stored pixels
READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
REDUCED_FLAGS = {f: flag | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in
                 ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}
# The loader's flags: straight to RGB (libjpeg writes RGB instead of BGR: the same pixels as BGR + cvtColor, bit for
# bit, without the extra pass); READ_FLAGS/REDUCED_FLAGS stay BGR for the callers that cv2.imread with them.
RGB_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
REDUCED_RGB_FLAGS = {f: flag | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in
                     ((2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                      (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))}
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
        data = os.pread(fd, size, 0)
        if len(data) < size:  # one pread stops at 2 GB (or the file shrank): read() loops
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
    finally:
        os.close(fd)
    try:
        with _libjpeg_messages() as messages:
            flags = REDUCED_RGB_FLAGS[reduce] if reduce > 1 and data[:3] == b"\xff\xd8\xff" else RGB_FLAGS
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except (cv2.error, MemoryError) as err:
        return None, f"cannot be decoded ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:120]})"
    damage = [line for line in messages if line.startswith(JPEG_DAMAGE)]
    if damage:
        return None, f"holds damaged JPEG data ({damage[0].decode(errors='replace')})"
    if image is None:
        return None, "cannot be decoded"
    return image, ""


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
            if written:  # (nothing written, the usual case: nothing to read back or truncate)
                text = os.pread(capture, written, 0)
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
