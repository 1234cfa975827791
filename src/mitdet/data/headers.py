"""Image width and height from the first bytes of a JPEG or PNG file: no pixel is decoded.

Only regular files are opened (a FIFO or a device would block or never end); symbolic links are followed, so a
link into another folder (DVC's symlink cache, a shared image store) reads as the file it points to.
"""
from __future__ import annotations

import os
import stat
import struct

HEAD_BYTES = 1024   # enough for SOF/IHDR in nearly every file; larger EXIF/ICC segments are skipped with pread
TAIL_BYTES = 64     # where the JPEG end-of-image marker or the PNG IEND chunk must be (truncation check)
# Larger images are refused: a decoder would need gigabytes per loader worker (OpenCV raises beyond 2^30 pixels)
MAX_PIXELS = 1 << 28
MAX_SIDE = 32768

# JPEG start-of-frame markers carrying the frame size (not DHT C4, JPG C8, DAC CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_SIG = b"\x89PNG\r\n\x1a\n"

# reasons returned (and written to rejected.csv by the index)
MISSING, EMPTY, NOT_IMAGE, TRUNCATED, BAD_HEADER = "missing_file", "empty_file", "not_an_image", "truncated", "bad_header"
NOT_REGULAR, TOO_LARGE = "not_a_regular_file", "image_too_large"


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
        else:
            return 0, 0, NOT_IMAGE
        if not reason and end not in os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES)):
            reason = TRUNCATED
        if not reason and (w * h > MAX_PIXELS or max(w, h) > MAX_SIDE):
            reason = TOO_LARGE
    except OSError:
        return 0, 0, NOT_IMAGE
    return (w, h, "") if not reason else (0, 0, reason)


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
