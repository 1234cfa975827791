"""Image width and height from the first bytes of a JPEG, PNG or `.npy` file: no pixel is decoded.

Only regular files are opened (a FIFO or a device would block or never end); symbolic links are followed, so a
link into another folder (DVC's symlink cache, a shared image store) reads as the file it points to.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

HEAD_BYTES = 1024   # enough for SOF/IHDR in nearly every file; larger EXIF/ICC segments are skipped with pread
TAIL_BYTES = 64     # where the JPEG end-of-image marker or the PNG IEND chunk must be (truncation check)
# Larger images are refused: a decoder would need gigabytes per loader worker (OpenCV raises beyond 2^30 pixels)
MAX_PIXELS = 1 << 28
MAX_SIDE = 32768

# JPEG start-of-frame markers carrying the frame size (not DHT C4, JPG C8, DAC CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
NPY_HEAD_BYTES = 4096  # numpy writes 64-byte aligned headers of ~128 bytes; a longer one is bad_header here
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels as decoded (palette expands to RGB)

# reasons returned (and written to rejected.csv by the index)
MISSING, EMPTY, NOT_IMAGE, TRUNCATED, BAD_HEADER = "missing_file", "empty_file", "not_an_image", "truncated", "bad_header"
NOT_REGULAR, TOO_LARGE = "not_a_regular_file", "image_too_large"
# .npy images: (H, W, C) uint8 with C >= 3 (channels 0-2 RGB); anything else is refused
CHANNELS_MISMATCH, UNSUPPORTED_ARRAY = "channels_mismatch", "unsupported_array"


@dataclass(frozen=True)
class Header:
    """What a header tells without decoding: size, channels as decoded, bits per sample (8/16), kind, or why not."""
    width: int
    height: int
    channels: int = 0
    bits: int = 0
    kind: str = ""       # jpeg | png | npy
    ndim: int = 0        # .npy only: 2 (H, W) or 3 (H, W, C)
    reason: str = ""


def open_regular(path: str) -> tuple[int | None, str]:
    """(a read-only fd, "") for a regular file (links followed), else (None, reason); never blocks on a FIFO."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, NOT_REGULAR
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, MISSING
    except (OSError, ValueError):  # a directory, no permission, a NUL byte in the name
        return None, NOT_IMAGE
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO between stat and open
        os.close(fd)
        return None, NOT_REGULAR
    return fd, ""


def probe(path: str) -> tuple[int, int, str]:
    """(width, height, "") for a readable JPEG/PNG; (0, 0, reason) otherwise. Never raises for a bad file."""
    fd, reason = open_regular(path)
    if fd is None:
        return 0, 0, reason
    try:
        return probe_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def probe_fd(fd: int, size: int) -> tuple[int, int, str]:
    """`probe` of an open regular file of `size` bytes (the file offset is not used)."""
    if size == 0:
        return 0, 0, EMPTY
    try:
        head = os.pread(fd, HEAD_BYTES, 0)
        if head[:3] == b"\xff\xd8\xff":
            w, h, reason = _jpeg_size(fd, head, size)
            end = b"\xff\xd9"
        elif head[:8] == _PNG_SIG:
            (w, h, reason), end = _png_size(head), b"IEND"
        elif head[:6] == _NPY_MAGIC:
            return _npy_image(_npy_header(fd, head, size))
        else:
            return 0, 0, NOT_IMAGE
        if not reason and end not in os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES)):
            reason = TRUNCATED
        if not reason and (w * h > MAX_PIXELS or max(w, h) > MAX_SIDE):
            reason = TOO_LARGE
    except OSError:
        return 0, 0, NOT_IMAGE
    return (w, h, "") if not reason else (0, 0, reason)


def read_header(path: str) -> Header:
    """The `Header` of a JPEG, PNG or .npy file (an aux image's channels and depth); reason set when unusable."""
    fd, reason = open_regular(path)
    if fd is None:
        return Header(0, 0, reason=reason)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0) if size else b""
        if head[:6] == _NPY_MAGIC:
            return _npy_header(fd, head, size)
        w, h, reason = probe_fd(fd, size)
        if reason:
            return Header(0, 0, reason=reason)
        if head[:8] == _PNG_SIG:
            bits, colour = (head[24], head[25]) if len(head) >= 26 else (0, -1)
            if colour not in _PNG_CHANNELS:
                return Header(0, 0, reason=BAD_HEADER)
            return Header(w, h, _PNG_CHANNELS[colour], 8 if colour == 3 else bits, "png")
        return Header(w, h, _jpeg_channels(fd, head, size), 8, "jpeg")
    except OSError:
        return Header(0, 0, reason=NOT_IMAGE)
    finally:
        os.close(fd)


def main_image(hd: Header) -> tuple[int, int, str]:
    """`probe`'s answer from a `read_header` result: an .npy image must be (H, W, C) uint8 with C >= 3."""
    return _npy_image(hd) if hd.kind == "npy" else (hd.width, hd.height, hd.reason)


def _npy_image(hd: Header) -> tuple[int, int, str]:
    """`probe`'s answer for an .npy image: (H, W, C) uint8 with C >= 3."""
    if hd.reason:
        return 0, 0, hd.reason
    if hd.ndim != 3 or hd.bits != 8:
        return 0, 0, UNSUPPORTED_ARRAY
    if hd.channels < 3:
        return 0, 0, CHANNELS_MISMATCH
    if hd.width * hd.height > MAX_PIXELS or max(hd.width, hd.height) > MAX_SIDE:
        return 0, 0, TOO_LARGE
    return hd.width, hd.height, ""


def _npy_header(fd: int, head: bytes, size: int) -> Header:
    """Shape and dtype from the .npy header (numpy's own parser, no pickle); the data must fit in the file.
    uint8 and uint16 arrays of 2 or 3 dimensions are readable; C or Fortran order both."""
    if len(head) < min(size, NPY_HEAD_BYTES):
        head = os.pread(fd, NPY_HEAD_BYTES, 0)
    end = _npy_header_end(head)
    if end > size:
        return Header(0, 0, reason=TRUNCATED)
    if not 0 < end <= len(head):
        return Header(0, 0, reason=BAD_HEADER)
    reason, shape, itemsize = _parse_npy_header(head[:end])
    if reason:
        return Header(0, 0, reason=reason)
    if end + int(np.prod(shape, dtype=np.int64)) * itemsize > size:
        return Header(0, 0, reason=TRUNCATED)
    channels = shape[2] if len(shape) == 3 else 1
    return Header(int(shape[1]), int(shape[0]), int(channels), 8 * itemsize, "npy", len(shape))


@functools.lru_cache(maxsize=1024)
def _parse_npy_header(head: bytes) -> tuple[str, tuple, int]:
    """(reason, shape, itemsize) of a complete .npy header; cached: a dataset's arrays share a few shapes, and
    numpy's parser (literal_eval) is most of the cost of reading one."""
    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return BAD_HEADER, (), 0
    except (ValueError, SyntaxError, TypeError, EOFError, struct.error):
        return BAD_HEADER, (), 0
    if dtype.hasobject or dtype.kind != "u" or dtype.itemsize not in (1, 2) or len(shape) not in (2, 3):
        return UNSUPPORTED_ARRAY, (), 0
    if min(shape) <= 0:
        return BAD_HEADER, (), 0
    return "", tuple(shape), dtype.itemsize


def _npy_header_end(head: bytes) -> int:
    """Where the .npy header says it ends (magic, version, length field, header); 0 when it cannot say."""
    if len(head) >= 12 and head[6] in (2, 3):
        return 12 + struct.unpack("<I", head[8:12])[0]
    return 10 + struct.unpack("<H", head[8:10])[0] if len(head) >= 10 else 0


def _jpeg_channels(fd: int, head: bytes, size: int) -> int:
    """Components in the JPEG frame header (1 gray, 3 colour, 4 CMYK); 0 when not found."""
    pos = 2
    while pos + 10 <= size:
        seg = os.pread(fd, 10, pos)
        if len(seg) < 10 or seg[0] != 0xFF:
            return 0
        if seg[1] == 0xFF or seg[1] in (0xD8, 0x01) or 0xD0 <= seg[1] <= 0xD7:
            pos += 1 if seg[1] == 0xFF else 2
            continue
        if seg[1] in _SOF:
            return seg[9]
        pos += 2 + ((seg[2] << 8) | seg[3])
    return 0


def probe_many(paths: list[str]) -> list[tuple[int, int, str]]:
    """`probe` over a chunk of paths (the unit of work one index process receives)."""
    return [probe(p) for p in paths]


def _jpeg_size(fd: int, buf: bytes, size: int) -> tuple[int, int, str]:
    """Walk the marker segments from offset 2 to the first SOF; segments past `buf` are read with pread."""
    pos, base = 2, 0  # pos: absolute file offset; buf holds file[base: base + len(buf)]
    while True:
        if pos + 9 > base + len(buf):  # need marker (2) + length (2) + SOF fields (5)
            if pos + 4 > size:
                return 0, 0, TRUNCATED
            buf, base = os.pread(fd, 512, pos), pos
        skip, found = _jpeg_segment(buf, pos - base)
        if found is not None:
            return found
        pos += skip
        if pos >= size:  # (a fill byte or standalone marker at the very end lands here too: truncated)
            return 0, 0, TRUNCATED


def _jpeg_segment(buf: bytes, i: int) -> tuple[int, tuple[int, int, str] | None]:
    """The segment at buf[i]: (bytes to skip, None) before the frame header, or (0, the probe's answer)."""
    if buf[i] != 0xFF:
        return 0, (0, 0, BAD_HEADER)
    marker = buf[i + 1]
    if marker == 0xFF:  # fill byte before a marker
        return 1, None
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
        return 2, None
    if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
        return 0, (0, 0, BAD_HEADER)
    if len(buf) < i + 4:
        return 0, (0, 0, TRUNCATED)
    length = (buf[i + 2] << 8) | buf[i + 3]
    if length < 2:
        return 0, (0, 0, BAD_HEADER)
    if marker not in _SOF:
        return 2 + length, None
    if len(buf) < i + 9:
        return 0, (0, 0, TRUNCATED)
    h, w = struct.unpack(">HH", buf[i + 5:i + 9])
    return 0, ((w, h, "") if w > 0 and h > 0 else (0, 0, BAD_HEADER))


def _png_size(head: bytes) -> tuple[int, int, str]:
    if len(head) < 24:
        return 0, 0, TRUNCATED
    if head[12:16] != b"IHDR":
        return 0, 0, BAD_HEADER
    w, h = struct.unpack(">II", head[16:24])
    return (w, h, "") if w > 0 and h > 0 else (0, 0, BAD_HEADER)
