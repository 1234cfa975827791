"""Image width and height from the first bytes of a JPEG or PNG file: no pixel is decoded."""
from __future__ import annotations

import os
import struct

HEAD_BYTES = 1024   # enough for SOF/IHDR in nearly every file; larger EXIF/ICC segments are skipped with pread
TAIL_BYTES = 64     # where the JPEG end-of-image marker or the PNG IEND chunk must be (truncation check)

# JPEG start-of-frame markers carrying the frame size (not DHT C4, JPG C8, DAC CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_SIG = b"\x89PNG\r\n\x1a\n"

# reasons returned (and written to rejected.csv by the index)
MISSING, EMPTY, NOT_IMAGE, TRUNCATED, BAD_HEADER = "missing_file", "empty_file", "not_an_image", "truncated", "bad_header"


def probe(path: str) -> tuple[int, int, str]:
    """(width, height, "") for a readable JPEG/PNG; (0, 0, reason) otherwise. Never raises for a bad file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0, 0, MISSING
    except (IsADirectoryError, PermissionError, OSError):
        return 0, 0, NOT_IMAGE
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0, EMPTY
        head = os.pread(fd, HEAD_BYTES, 0)
        if head[:3] == b"\xff\xd8\xff":
            w, h, reason = _jpeg_size(fd, head, size)
            if not reason and b"\xff\xd9" not in os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES)):
                reason = TRUNCATED
        elif head[:8] == _PNG_SIG:
            w, h, reason = _png_size(head)
            if not reason and b"IEND" not in os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES)):
                reason = TRUNCATED
        else:
            return 0, 0, NOT_IMAGE
        return (w, h, "") if not reason else (0, 0, reason)
    except OSError:
        return 0, 0, NOT_IMAGE
    finally:
        os.close(fd)


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
