"""build_index's read of a COCO instances file: polygon segmentations cut out unparsed, the annotations a chunk at a
time, so neither the file nor its parsed annotations are ever in memory whole.

`read_for_index` returns the file's dict, its `annotations` left empty, and the annotations as an iterable of
dicts: `AnnotationChunks` (the array read and parsed about `CHUNK` bytes at a time) when the file's layout allows,
else the list of one boxes-only parse of the whole file (`read_boxes_only`). A chunk is cut only where the text
parses as whole array elements, so a wrong cut cannot go unnoticed: it fails to parse and the next place is tried.
A file the chunks cannot follow (NaN, malformed, elements that keep failing to parse) raises `NotStreamable`
during iteration; build_index then indexes again from whole parses, which say what is wrong and where.

Why: orjson builds a document tree of its own before the Python objects, so one parse of a COCO-train-sized file
without its polygons (143 MB of 405) peaked at 1.15 GB, and the 785k parsed dicts stayed alive while the index was
built.
"""
from __future__ import annotations

import itertools
import mmap
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from mitdet.data.index import _read_json_fast, check_coco, orjson
from mitdet.errors import DataError

CHUNK = 8 << 20  # bytes of annotation text per parse
_TRIES = 8  # places tried per chunk, and `annotations` keys, before the file is read whole
_DROP_EVERY = 32 << 20  # mapped pages behind the scan are handed back this often
_WINDOW = 32 << 20  # bytes read at a time when searching the file
_SLACK = 1 << 20  # read beyond a window or chunk, so that a match at its edge is seen whole
_END_CANDIDATES = 10_000  # `}]` looked at as the annotations' end before the file is read whole
_PROBE = 1 << 16  # bytes after a candidate end that `_may_end` parses

# `"segmentation":` and a polygon list: lists of number characters only, `[[...], [...]]`. What is not that shape
# (an RLE dict, a string in a list) is left to be parsed. No lookbehind for an escaped quote in the patterns: it
# would cost re its literal-prefix search, 5x slower; the loop checks instead
_POLYGON_START = re.compile(rb'"segmentation"\s*:\s*\[\s*\[')
_NUMBERS = rb"[-0-9.eE+,\s]*"
_POLYGON = re.compile(_POLYGON_START.pattern + _NUMBERS + rb"(?:\]\s*,\s*\[" + _NUMBERS + rb")*\]\s*\]")
_ANNOTATIONS = re.compile(rb'"annotations"\s*:\s*\[')
_COMPACT_END = re.compile(rb"\}\]")  # an element's end and the array's: where the annotations may end
_ARRAY_END = re.compile(rb"\}\s+\]")  # the same, indented
_BETWEEN = re.compile(rb"\}\s*,\s*\{")  # between two elements (or two objects deeper in one)
_SPACE = b" \t\n\r"


class NotStreamable(Exception):
    """The annotations cannot be followed chunk by chunk (malformed, NaN, an odd layout): read the file whole."""


def cut_polygons(data, start: int, end: int, out: bytearray) -> bool:
    """Append `data[start:end]` to `out` with every polygon segmentation replaced by `[]`; whether one was cut.

    What is cut runs from `[[` to the first `]]` with no string between: when the brackets between balance, that is
    the whole value; when they do not, what is left fails to parse (the caller then reads the file whole), so a
    wrong cut is never silent. COCO train2017's polygons are two thirds of its JSON: parsing them only to drop them
    made one parse of a 405 MB file peak at 3.8 GB. An mmap's pages behind the scan are handed back as it goes."""
    view, pos, cut, find = memoryview(data), start, False, data.find
    dropped, drop = start - start % mmap.PAGESIZE, getattr(data, "madvise", None)
    try:
        for m in _POLYGON_START.finditer(data, start, end):
            first = m.start()
            if first > 0 and data[first - 1] == 0x5C:  # `\"segmentation`: text in a string that looks like one
                continue
            stop = find(b"]]", m.end(), end)  # the compact form: the list ends at the first `]]`; a fast search
            if stop >= 0 and find(b'"', m.end(), stop) < 0:  # no string inside: numbers and brackets
                stop += 2
            else:  # spaces between the brackets (indented JSON), or a string: the whole pattern, else left
                whole = _POLYGON.match(data, first, end)
                if whole is None:
                    continue
                stop = whole.end()
            out += view[pos:first]
            out += b'"segmentation":[]'
            pos, cut = stop, True
            if drop is not None and pos - dropped > _DROP_EVERY:  # read-only mapped pages: dropped, not lost
                upto = pos - pos % mmap.PAGESIZE
                drop(mmap.MADV_DONTNEED, dropped, upto - dropped)
                dropped = upto
        out += view[pos:end]
        return cut
    finally:
        view.release()  # an mmap cannot be closed while a view of it is alive


def without_polygons(data) -> bytearray | None:
    """`data` with every polygon segmentation replaced by `[]`, or None when it has none."""
    out = bytearray()
    return out if cut_polygons(data, 0, len(data), out) else None


def read_boxes_only(path: Path, fix: str) -> dict:
    """The whole file parsed at once, its annotations' polygon segmentations as []; checked by `check_coco`."""
    coco = None
    if orjson is not None and path.stat().st_size > 0:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            stripped = without_polygons(data)  # mapped, not read: no private copy of the whole file
        if stripped is not None:
            try:
                coco = orjson.loads(stripped)
            except orjson.JSONDecodeError:  # NaN, or not JSON: the whole file's parse says which, where
                coco = None
            del stripped
            if _segmentation_outside_annotations(coco):  # emptied where it is data the index copies: read it whole
                coco = None
    return check_coco(_read_json_fast(path) if coco is None else coco, str(path), fix=fix)


def _segmentation_outside_annotations(coco) -> bool:
    """Whether a `segmentation` key sits anywhere `without_polygons` must not empty: outside the annotations."""
    if not isinstance(coco, dict):
        return False
    if "segmentation" in coco or any(isinstance(v, dict) and "segmentation" in v for v in coco.values()):
        return True
    return any(isinstance(e, dict) and "segmentation" in e
               for key, entries in coco.items() if key != "annotations" and isinstance(entries, list)
               for e in entries)


def read_for_index(path: str | Path, fix: str, stream: bool = True) -> tuple[dict, Iterable[dict]]:
    """(the file's checked dict with `annotations` emptied, its annotations to iterate once); a DataError naming
    the file when it is missing or not COCO. `stream=False`: from one whole parse."""
    path = Path(path)
    if not path.is_file():
        raise DataError("COCO annotation file not found", where=str(path), fix=fix)
    chunks = AnnotationChunks.open(path, fix) if stream and orjson is not None else None
    if chunks is not None:
        return chunks.coco, chunks
    coco = read_boxes_only(path, fix)
    annotations, coco["annotations"] = coco["annotations"], []
    return coco, _consumed(annotations)


def _consumed(items: list) -> Iterator:
    """The items of `items`, each let go from the list as it is handed out."""
    for i in range(len(items)):
        item, items[i] = items[i], None
        yield item


class AnnotationChunks:
    """The annotations array of a COCO file, read and parsed a chunk at a time as it is iterated (once); `coco` is
    the rest of the file, parsed. `open` returns None when the array cannot be found."""

    def __init__(self, path: Path, f, first: int, end: int, coco: dict):
        self.path, self.coco, self._file, self._first, self._end = path, coco, f, first, end
        self._buf = bytearray()  # made at the first read: a split waiting its turn holds none

    @classmethod
    def open(cls, path: Path, fix: str) -> AnnotationChunks | None:
        f = open(path, "rb", buffering=0)  # read straight into the caller's buffers
        try:
            found = _find_annotations(f, os.fstat(f.fileno()).st_size)
            if found is not None:
                check_coco(found[2], str(path), fix=fix)
                return cls(path, f, *found)
        except DataError:  # not COCO, or an end found past the array's (its last element not an object): the
            pass           # whole parse says which
        except BaseException:
            f.close()
            raise
        f.close()
        return None

    def __iter__(self) -> Iterator[dict]:
        pos = self._first
        try:
            while pos < self._end:
                items, pos = self._next_chunk(pos)
                yield from items
        finally:
            self.close()

    def _next_chunk(self, pos: int) -> tuple[list, int]:
        """(the elements parsed from `pos` on, where the next chunk starts): cut after about CHUNK bytes, at the
        first place between elements where the text parses; the rest whole when it is short."""
        left = self._end - pos
        if left <= CHUNK + _SLACK:
            n = self._read_into(pos, left)
            items = _parsed(self._buf, n)
            if items is None:
                raise NotStreamable(f"{self.path}: the annotations from byte {pos} on do not parse")
            return items, self._end
        n = self._read_into(pos, CHUNK + _SLACK)
        text = self._buf
        search = CHUNK
        for _ in range(_TRIES):
            m = _BETWEEN.search(text, search, n)
            if m is None:  # no place between elements in the slack: elements of a megabyte, or not objects
                break
            items = _parsed(text, m.start() + 1)
            if items is not None:
                return items, pos + m.end() - 1
            search = m.start() + 1  # inside an element (or a string): the next place
        raise NotStreamable(f"{self.path}: the annotations at byte {pos} do not parse in chunks")

    def _read_into(self, pos: int, n: int) -> int:
        """Read `n` bytes from `pos` into the start of the one reused buffer (fresh memory per chunk would cost a
        page fault per 4 KB: a second over a 400 MB file); how many were read."""
        if len(self._buf) < n:
            self._buf = bytearray(n)
        return _read_into(self._file, memoryview(self._buf)[:n], pos)

    def close(self) -> None:
        self._file.close()
        self._buf = bytearray()


def _read(f, n: int, offset: int) -> bytearray:
    """`n` bytes of the file from `offset` (fewer at its end), in a buffer of their own (no second copy)."""
    buf = bytearray(n)
    del buf[_read_into(f, memoryview(buf), offset):]
    return buf


def _read_into(f, view: memoryview, offset: int) -> int:
    """Fill `view` from the (unbuffered) file `f` at `offset`, however many reads that takes; how many bytes were read."""
    done = 0
    f.seek(offset)
    with view:
        while done < len(view):
            k = f.readinto(view[done:])
            if not k:
                break
            done += k
    return done


def _parsed(text, stop: int) -> list | None:
    """`text[:stop]` parsed as the elements of a list, its polygons cut out; None when it does not parse."""
    buf = bytearray(b"[")
    cut_polygons(text, 0, stop, buf)
    buf += b"]"
    try:
        return orjson.loads(buf)
    except orjson.JSONDecodeError:
        return None


def _find(f, size: int, pattern: re.Pattern, start: int) -> Iterator[re.Match]:
    """(window offset, match) of `pattern` in the file from `start` on, read a window at a time."""
    lo, window = start, bytearray(min(_WINDOW + _SLACK, max(size - start, 0)))
    while lo < size:
        n = _read_into(f, memoryview(window)[:min(len(window), size - lo)], lo)
        for m in pattern.finditer(window, 0, n):
            if m.start() >= _WINDOW and lo + n < size:  # the next window has it whole
                break
            yield lo, m
        lo += _WINDOW


def _find_annotations(f, size: int) -> tuple[int, int, dict] | None:
    """(the first element's offset, the array's closing `]` offset, the rest of the file parsed) of the top-level
    `annotations` array, or None. Its end is the first `}]` after which the file, with the array replaced by a
    marker string, parses with the marker as `coco["annotations"]`: an earlier `}]` (objects nested in an element,
    or text in a string) cannot, its brackets would not balance. `_may_end` sets most of those aside cheaply."""
    marker = ('"mitdet-annotations-' + os.urandom(8).hex() + '"').encode()
    starts = (lo + m.end() for lo, m in _find(f, size, _ANNOTATIONS, 0)
              if m.start() == 0 or m.string[m.start() - 1] != 0x5C)  # not `\"annotations`, in a string
    for first in itertools.islice(starts, _TRIES):
        after = _read(f, min(64, size - first), first)
        blank = len(after) - len(after.lstrip(_SPACE))
        if after[blank:blank + 1] == b"]":  # `[]`: no annotations
            ends = iter([first + blank])
        else:
            ends = (lo + m.end() - 1 for lo, m in itertools.chain(_find(f, size, _COMPACT_END, first),
                                                                  _find(f, size, _ARRAY_END, first)))
        head = None
        for end in itertools.islice(ends, _END_CANDIDATES):
            if not _may_end(f, size, end):
                continue
            head = _read(f, first - 1, 0) if head is None else head  # up to the array's `[`
            try:
                coco = orjson.loads(b"".join((head, marker, _read(f, size - end - 1, end + 1))))
            except orjson.JSONDecodeError:
                continue
            if not isinstance(coco, dict) or coco.get("annotations") != marker[1:-1].decode():
                break  # the key is not the top-level one
            coco["annotations"] = []
            return first, end, coco
    return None


def _may_end(f, size: int, end: int) -> bool:
    """Whether the next `_PROBE` bytes after `end` can go on from a value in an object, as the rest of the file
    does after the array: a `]` inside an element fails this within that element's text, not at the window's end."""
    window = _read(f, min(_PROBE, size - end - 1), end + 1)
    if len(window) == _PROBE:  # not the file's end: drop a character the window cut in two
        window = window.rstrip(bytes(range(0x80, 0x100)))
    try:
        orjson.loads(b'{"":0' + window)
    except orjson.JSONDecodeError as err:
        return len(window) < size - end - 1 and err.msg == "unexpected end of data"  # cut off, not wrong
    return True
