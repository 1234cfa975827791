"""build_index: validate images by their headers and annotations by rule; write the index the trainer reads.

Outputs (under `out_dir`): `<split>.jsonl` (one kept image a line: the training targets), `categories.json`,
`instances_<split>.json` (the evaluation ground truth), `rejected.csv` (one row per dropped image or box) and
`source.json` (the raw manifest's source and per-split fingerprint, so that the index changes whenever the raw data
does). Bad files and boxes are counted and skipped; a malformed annotation JSON is a DataError naming the file and
the entry (`read_coco`/`check_coco`: the one COCO shape check, also the scorer's). Nothing under `out_dir` holds
timings: an unchanged dataset indexed again gives byte-identical files.

The evaluation ground truth is the official one restricted to the kept images: every valid annotation of those
images with its own box and area (crowd regions, and boxes under `min_box_size`, which only training leaves out),
so scores match COCO's own. Its annotation ids are renumbered 1..N (both COCO evaluators read id 0 as 'unmatched');
`source_id` there, `ann_ids` in the .jsonl and rejected.csv carry the dataset's ids. Invalid boxes (non-finite,
degenerate, outside the image) and unknown categories are dropped from both.

rejected.csv: an image-level row (one per rejected image entry) has an empty `ann_id`; every annotation-level row
has a non-empty one (the annotation's id, or `#<position in the JSON list>` when it has no integer id). Boxes on a
rejected image are annotation rows with reason `image_rejected`, so per split
annotations_kept (training targets) + sum(annotations_rejected) == annotations; `box_too_small` rows are left out
of training only, so gt_annotations == annotations_kept + box_too_small.

Test splits (the manifest's `tests`) are indexed like val; `layout.json` lists them with `aux_channels`. With
`index.aux_channels` N > 0 every image needs an aligned N-channel aux image: `<aux>/<file stem>.png` or `.npy` in
the split's aux folder (both present: `aux_ambiguous`), or, without an aux folder, channels 3.. of an .npy image of
3 + N channels; headers only, each failure an image-level reason (`aux_missing`, `aux_ambiguous`, `aux_bad_header`,
`aux_size_mismatch`, `aux_channels_mismatch`, `channels_mismatch`). With N = 0 nothing of this is read or written
but layout.json. Categories are those of train and val: a box of a category only a test split has is
`unknown_category` (the labels, and so the model, do not depend on the test splits).
"""
from __future__ import annotations

import csv
import gc
import json
import math
import multiprocessing
import os
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitdet.data.headers import CHANNELS_MISMATCH, main_image, probe_many, read_header
from mitdet.errors import DataError
from mitdet.io import atomic_path, clean_json, finite_or_none, read_json, write_bytes, write_json
from mitdet.params import IndexParams

try:  # 5-10x faster JSON for COCO-sized files
    import orjson
except ImportError:  # pragma: no cover - the plain library gives the same results, slower
    orjson = None

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
REJECTED_COLUMNS = ["split", "file", "image_id", "ann_id", "reason"]
INLINE_BELOW = 2000  # fewer images than this are probed in-process: a pool costs more than it saves
COCO_LISTS = ("images", "annotations", "categories")
REBUILD = "run `dvc repro build_index`"
REPREPARE = "run `dvc repro prepare_data`"
AUX_EXTS = (".png", ".npy")  # looked up in this order, lower case; both present is `aux_ambiguous`


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    label: int


@dataclass
class ImageRecord:
    image_id: int
    file: str
    width: int
    height: int
    boxes: np.ndarray         # float32 [N, 4] xyxy pixels (crowd regions included, flagged by iscrowd)
    labels: np.ndarray        # int64 [N], 1..K
    category_ids: np.ndarray  # int64 [N], the dataset's own ids
    iscrowd: np.ndarray       # bool [N]
    aux: str | None = None    # the aligned aux image (PNG or .npy; == file: channels 3.. of an .npy), or None


@dataclass
class SplitIndex:
    split: str
    images: list[ImageRecord]
    categories: list[Category]
    aux_channels: int = 0     # channels of each record's aux image (layout.json; 0 without one: RGB only)


# ------------------------------------------------------------------------------------------------- loading
def load_split(index_dir: str | Path, split: str, root: str | Path | None = None) -> SplitIndex:
    """Read `<index_dir>/<split>.jsonl` and `categories.json` (written by build_index).

    Image paths in the index are relative to the project root (or absolute); with `root` given, relative ones
    are joined to it, otherwise they are left relative to the working directory (the stages run from the root).
    """
    index_dir = Path(index_dir)
    path = index_dir / f"{split}.jsonl"
    for needed in (path, index_dir / "categories.json"):
        if not needed.is_file():
            raise DataError(f"no index yet (split '{split}')", where=str(needed), fix=REBUILD)
    try:
        categories = [Category(int(c["id"]), str(c["name"]), int(c["label"]))
                      for c in read_json(index_dir / "categories.json")]
    except DataError:
        raise
    except (TypeError, KeyError, ValueError) as err:
        raise DataError(f"not an index categories file ({err!r})", where=str(index_dir / "categories.json"),
                        fix=REBUILD) from None
    images = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                boxes = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"not an index line ({err!r})", where=f"{path}:{n}", fix=REBUILD) from None
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            images.append(ImageRecord(
                image_id=int(r["image_id"]), file=_rooted(r["file"], root), width=int(r["width"]),
                height=int(r["height"]), boxes=boxes, labels=np.asarray(r["labels"], np.int64),
                category_ids=np.asarray(r["category_ids"], np.int64), iscrowd=np.asarray(r["iscrowd"], bool),
                aux=_rooted(r["aux"], root) if "aux" in r else None))
    return SplitIndex(split=split, images=images, categories=categories,
                      aux_channels=int(_layout(index_dir).get("aux_channels", 0)))


def test_splits(index_dir: str | Path) -> list[str]:
    """The test split names build_index indexed (layout.json; [] for an index without one)."""
    return [str(t) for t in _layout(Path(index_dir)).get("tests", [])]


test_splits.__test__ = False  # not a test: pytest would collect it wherever a test module imports it


def _layout(index_dir: Path) -> dict:
    """layout.json ({"tests", "aux_channels"}); {} when absent (an index written by hand or by an older version)."""
    path = index_dir / "layout.json"
    if not path.is_file():
        return {}
    layout = read_json(path)
    if not isinstance(layout, dict) or not isinstance(layout.get("tests", []), list) \
            or not _is_int(layout.get("aux_channels", 0)):
        raise DataError("not an index layout file", where=str(path), fix=REBUILD)
    return layout


def _rooted(file: str, root) -> str:
    return file if root is None or os.path.isabs(file) else os.path.join(root, file)


# ------------------------------------------------------------------------------------------------ building
def build_index(manifest_path: str | Path, params: IndexParams, out_dir: str | Path, metrics_path: str | Path | None = None,
                root: str | Path = ".") -> dict:
    """Index every split the manifest names; write the outputs atomically and return the metrics.

    The cyclic garbage collector is paused throughout: nothing here makes reference cycles, and on a COCO-sized
    file its passes over the millions of parsed objects cost more than the parse itself (orjson.loads of 400 MB:
    13.6 s with it, 5.6 s without)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return _build_index(manifest_path, params, out_dir, metrics_path, root)
    finally:
        if paused:
            gc.enable()


def _build_index(manifest_path, params: IndexParams, out_dir, metrics_path, root) -> dict:
    t_start = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    manifest, splits, tests = _read_manifest(root, manifest_path)
    names = [*SPLITS, *tests]
    cocos = {s: read_coco(root / splits[s]["annotations"], boxes_only=True,
                          fix=f"fix the file (data.local.{s if s in SPLITS else 'tests.' + s}.annotations) or "
                              f"{REPREPARE} again") for s in names}
    categories = _categories({s: cocos[s] for s in SPLITS}, {s: splits[s]["annotations"] for s in SPLITS})
    label_of = {c.id: c.label for c in categories}
    gt_categories = [{"id": c.id, "name": c.name} for c in categories]

    pool = None
    if params.workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(params.workers)
    rejected: list[list] = []
    metrics: dict = {"categories": len(categories), "workers": params.workers, "min_box_size": params.min_box_size,
                     **({"aux_channels": params.aux_channels} if params.aux_channels else {}), "splits": {}}
    try:
        for split in names:
            t0 = time.perf_counter()
            lines, gt, counts = _index_split(split, splits[split], cocos.pop(split), label_of, gt_categories,
                                             params, pool, rejected, root)  # popped: freed once indexed
            write_bytes(out_dir / f"{split}.jsonl", b"".join(lines))
            del lines
            write_bytes(out_dir / f"instances_{split}.json", b"".join(gt))
            del gt
            seconds = time.perf_counter() - t0
            counts["seconds"] = round(seconds, 4)
            counts["images_per_s"] = round(counts["images"] / seconds, 1) if seconds > 0 else None
            metrics["splits"][split] = counts
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    write_json(out_dir / "source.json", {"source": manifest.get("source"), "fingerprint": manifest.get("fingerprint")})
    write_json(out_dir / "categories.json", [{"id": c.id, "name": c.name, "label": c.label} for c in categories])
    write_json(out_dir / "layout.json", {"tests": tests, "aux_channels": params.aux_channels})
    with atomic_path(out_dir / "rejected.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(REJECTED_COLUMNS)
            w.writerows(rejected)
    metrics["warnings"] = _warnings(metrics["splits"])
    for warning in metrics["warnings"]:
        log.warning("%s", warning)
    seconds = time.perf_counter() - t_start
    total = sum(m["images"] for m in metrics["splits"].values())
    metrics["seconds"] = round(seconds, 4)
    metrics["images_per_s"] = round(total / seconds, 1) if seconds > 0 else None
    if metrics_path is not None:
        write_json(root / metrics_path if not Path(metrics_path).is_absolute() else metrics_path, metrics)
    return metrics


def _warnings(splits: dict) -> list[str]:
    """What a reader of the numbers must know: a split with no image left, annotation ids shared by several."""
    out = []
    for split, m in splits.items():
        if m["images_kept"] == 0:
            use = ("training has no data" if split == "train" else
                   "validation and evaluation have nothing to score" if split == "val" else "its evaluation scores nothing")
            out.append(f"{split}: no image kept (of {m['images']}); {use}: see rejected.csv")
        if m["annotation_ids_shared"]:
            out.append(f"{split}: {m['annotation_ids_shared']} annotation(s) reuse another annotation's id; all kept, "
                       f"renumbered in instances_{split}.json (source_id keeps the dataset's id)")
    return out


def _read_manifest(root: Path, manifest_path) -> tuple[dict, dict, list[str]]:
    """The raw manifest, its `splits` (each naming `images` and `annotations`) and test split names; else a
    DataError."""
    if not (root / manifest_path).is_file():
        raise DataError("not found: the data is not prepared yet", where=str(manifest_path), fix=f"{REPREPARE} first")
    manifest = read_json(root / manifest_path)
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise DataError("no `splits` mapping", where=str(manifest_path), fix=f"{REPREPARE} again")
    tests = manifest.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(t, str) and t not in SPLITS for t in tests):
        raise DataError(f"`tests` must list test split names; got {_short(tests)}", where=str(manifest_path),
                        fix=f"{REPREPARE} again")
    for split in (*SPLITS, *tests):
        if not isinstance(splits.get(split), dict) or not {"images", "annotations"} <= set(splits[split]):
            raise DataError(f"split '{split}' is missing (it needs `images` and `annotations`)",
                            where=str(manifest_path), fix=f"{REPREPARE} again or fix data.local.{split}")
    return manifest, splits, tests


# ----------------------------------------------------------------------------------------- COCO JSON shape
def read_coco(path: str | Path, *, strict: bool = False, fix: str = "fix or re-download the file",
              boxes_only: bool = False) -> dict:
    """Read a COCO instances JSON and check its shape (`check_coco`); every failure is a DataError naming it.

    `boxes_only` (build_index, which never reads masks): annotations' polygon segmentations come back as [], unparsed."""
    path = Path(path)
    if not path.is_file():
        raise DataError("COCO annotation file not found", where=str(path), fix=fix)
    coco = None
    if boxes_only and orjson is not None:
        stripped = without_polygons(path.read_bytes())
        if stripped is not None:
            try:
                coco = orjson.loads(stripped)
            except orjson.JSONDecodeError:  # NaN, or not JSON: the whole file's parse says which, where
                coco = None
            del stripped
            if _segmentation_outside_annotations(coco):  # emptied where it is data the index copies: read it whole
                coco = None
    return check_coco(_read_json_fast(path) if coco is None else coco, str(path), strict=strict, fix=fix)


# `"segmentation":` before a polygon list `[[` (whitespace allowed); the list runs to the first `]]`. No lookbehind
# for an escaped quote in the pattern: it would cost re its literal-prefix search, 5x slower; the loop checks instead
_POLYGONS = re.compile(rb'"segmentation"\s*:\s*(?=\[\s*\[)')
_POLYGONS_END = re.compile(rb'\]\s*\]')
_POLYGON_BYTES = b"0123456789.eE+-, \t\n\r[]"


def without_polygons(data: bytes) -> bytes | None:
    """`data` with every polygon segmentation replaced by `[]`, or None when there is none or what would be
    removed is not only numbers, commas and brackets (then nothing is: the caller parses `data` as it is).

    COCO train2017's polygons are two thirds of its JSON; parsing them into Python lists, only to drop them, made
    `orjson.loads` of a 405 MB file peak at 3.8 GB (about 1.2 GB without them) and take 3.4 s (2.6 s with this)."""
    parts, pos, end_of = [], 0, _POLYGONS_END.search
    for m in _POLYGONS.finditer(data):
        start = m.end()
        if start < pos or data[m.start() - 1] == 0x5C:  # in a removed span (the check rejects it), or `\"`: a string
            continue
        end = end_of(data, start)
        if end is None:
            break
        parts += (data[pos:start], b"[]")
        pos = end.end()
    if not parts:
        return None
    parts.append(data[pos:])
    out = b"".join(parts)
    del parts
    # the removed spans held only number characters iff everything else is the same, character for character
    return out if data.translate(None, _POLYGON_BYTES) == out.translate(None, _POLYGON_BYTES) else None


def _segmentation_outside_annotations(coco) -> bool:
    """Whether a `segmentation` key sits anywhere `without_polygons` must not empty: outside the annotations."""
    if not isinstance(coco, dict):
        return False
    if "segmentation" in coco or any(isinstance(v, dict) and "segmentation" in v for v in coco.values()):
        return True
    return any(isinstance(e, dict) and "segmentation" in e
               for key, entries in coco.items() if key != "annotations" and isinstance(entries, list)
               for e in entries)


def check_coco(coco, where: str, *, strict: bool = False, fix: str | None = None) -> dict:
    """`coco` itself when it has the COCO shape, else a DataError naming `where` and the entry at fault.

    Categories always need an integer `id` and a string `name`. With `strict` (the scorer's ground truth), images
    need an integer `id` and annotations integer `image_id`/`category_id` and a 4-number `bbox`; without it,
    build_index counts and skips such entries itself.
    """
    if not isinstance(coco, dict):
        raise DataError(f"expected a COCO object with `images`, `annotations`, `categories`; got a JSON "
                        f"{_json_type(coco)}", where=where, fix=fix)
    for key in COCO_LISTS:
        if not isinstance(coco.get(key), list):
            raise DataError(f"field `{key}` is missing or not a list; this is not a COCO instances file",
                            where=where, fix=fix)
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DataError(f"categories[{i}] needs an integer `id` and a string `name`; got {_short(c)}",
                            where=where, fix=fix)
    if strict:
        for i, im in enumerate(coco["images"]):
            if not isinstance(im, dict) or not _is_int(im.get("id")):
                raise DataError(f"images[{i}] needs an integer `id`; got {_short(im)}", where=where, fix=fix)
        for i, a in enumerate(coco["annotations"]):
            if not _is_box_entry(a):
                raise DataError(f"annotations[{i}] needs integer `image_id` and `category_id` and a `bbox` of 4 "
                                f"numbers; got {_short(a)}", where=where, fix=fix)
    return coco


def _is_box_entry(a) -> bool:
    return (isinstance(a, dict) and _is_int(a.get("image_id")) and _is_int(a.get("category_id"))
            and type(a.get("bbox")) is list and len(a["bbox"]) == 4 and all(type(v) in _NUMBER for v in a["bbox"]))


def _json_type(v) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _short(v, limit: int = 80) -> str:
    """repr of an entry, cut: an error must stay one readable line."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json_fast(path: Path):
    """orjson when installed (5-10x faster on COCO-sized files), else the standard parser; malformed JSON is a
    DataError naming the file."""
    return _loads(path.read_bytes(), path)


def _loads(data: bytes, path: Path):
    # orjson refuses the NaN/Infinity that Python's json.dump writes: the standard parser then reads the file, and
    # the index rejects those boxes one by one instead of the whole file
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"not valid JSON ({err})", where=str(path)) from None


def _categories(cocos: dict[str, dict], paths: dict[str, str]) -> list[Category]:
    """The union of the splits' categories (shape checked by check_coco), sorted by id, labelled 1..K."""
    names: dict[int, str] = {}
    where: dict[int, str] = {}
    for split, coco in cocos.items():
        for c in coco["categories"]:
            cid = int(c["id"])
            if cid in names and names[cid] != c["name"]:
                raise DataError(f"category id {cid} is '{names[cid]}' in {where[cid]} but '{c['name']}' here",
                                where=paths[split], fix="the splits must share one category list")
            names[cid], where[cid] = c["name"], paths[split]
    if not names:
        raise DataError("no categories", where=paths["train"], fix="a detection dataset needs at least one")
    return [Category(cid, names[cid], label) for label, cid in enumerate(sorted(names), start=1)]


def _dump_bytes(value) -> bytes:
    """`_dumps` as UTF-8 bytes, without the newline."""
    if orjson is None:
        return json.dumps(clean_json(value), separators=(",", ":"), allow_nan=False).encode()
    return orjson.dumps(value)


def _dumps(value) -> str:
    """One JSON line; a non-finite number (only possible in fields copied as they are, such as an image entry's
    extras) becomes null, as orjson writes it."""
    if orjson is None:
        return json.dumps(clean_json(value), separators=(",", ":"), allow_nan=False) + "\n"
    return orjson.dumps(value).decode() + "\n"


_NUMBER = (int, float)  # exact types: bool is not a number here


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Rejects:
    """The rows of rejected.csv one split adds, and its counts by reason (images and annotations apart)."""

    def __init__(self, split: str, rows: list[list]):
        self.split, self.rows = split, rows
        self.images, self.annotations = Counter(), Counter()

    def image(self, file, image_id, reason) -> None:
        self.images[reason] += 1
        self.rows.append([self.split, _csv_safe(file), image_id, "", reason])  # empty ann_id: an image-level row

    def annotation(self, file, image_id, ann_id, reason) -> None:
        self.annotations[reason] += 1
        self.rows.append([self.split, _csv_safe(file), image_id, ann_id, reason])


def _csv_safe(file):
    """A file name as rejected.csv can hold it: a NUL byte (which Python 3.10's csv reader refuses) as `\\x00`."""
    return file.replace("\0", "\\x00") if isinstance(file, str) else file


def _index_split(split, paths, coco, label_of, categories, params, pool, rejected, root):
    """One split: (index lines, evaluation ground truth, counts), the first two as lists of bytes to join; rejected
    rows are appended to `rejected`. `categories`: the ground truth's category list."""
    images_dir, n_aux = paths["images"], params.aux_channels
    counts = {"images": len(coco["images"]), "images_kept": 0, "annotations": len(coco["annotations"]),
              "annotations_kept": 0, "crowd_kept": 0, "boxes_clipped": 0, "gt_annotations": 0,
              "annotation_ids_shared": 0}
    rejects = _Rejects(split, rejected)
    entries, rejected_image_ids = _image_entries(coco["images"], images_dir, rejects)
    # headers, in parallel: started now, collected after the annotations, so the two overlap
    files = [e[1] for e in entries.values()]
    probe_paths = files if str(root) in ("", ".") else [os.path.join(root, f) for f in files]
    aux_bases = None
    if n_aux:  # the aux path of each image, without extension (relative as `file` is, and as probed)
        aux_bases = [None if paths.get("aux") is None else
                     os.path.join(paths["aux"], os.path.splitext(e[0]["file_name"])[0]) for e in entries.values()]
        probe_paths = [(p, None if b is None else os.path.join(root, b), n_aux)
                       for p, b in zip(probe_paths, aux_bases, strict=True)]
    pending = _probe_start(probe_paths, pool, params.workers)
    counts["annotation_ids_shared"] = _attach_annotations(coco["annotations"], entries, rejected_image_ids,
                                                          label_of, params.min_box_size, rejects)
    lines, gt_images, gt_chunks = _kept_images(entries, _probe_finish(pending), label_of, counts, rejects, aux_bases)
    counts["images_rejected"] = dict(sorted(rejects.images.items()))
    counts["annotations_rejected"] = dict(sorted(rejects.annotations.items()))
    # instances_<split>.json as `_dumps` of {info, licenses, images, annotations, categories} writes it, the
    # annotations already serialised image by image
    info = coco.get("info", {}) if isinstance(coco.get("info"), dict) else {}
    licenses = coco.get("licenses", []) if isinstance(coco.get("licenses"), list) else []
    gt = [b'{"info":', _dump_bytes(info), b',"licenses":', _dump_bytes(licenses), b',"images":',
          _dump_bytes(gt_images), b',"annotations":[', b",".join(gt_chunks), b'],"categories":',
          _dump_bytes(categories), b"}\n"]
    return lines, gt, counts


def _image_ok(im) -> bool:
    return (type(im) is dict and type(im.get("id")) is int and type(im.get("file_name")) is str and im["file_name"]
            and type(im.get("width")) is int and type(im.get("height")) is int and im["width"] > 0 and im["height"] > 0)


def _bad_file_name(name: str) -> bool:
    """Absolute, climbing out with `..`, or holding a NUL byte (no file system can open that name)."""
    return name[0] in "/\\" or "\0" in name or (".." in name and ".." in Path(name).parts)


def _image_entries(images: list, images_dir: str, rejects: _Rejects) -> tuple[dict, set]:
    """{id: (entry, file, [boxes], float width, float height)} of the well-formed image entries with plain relative file names, and the ids of
    the rejected ones (their boxes are then `image_rejected`, not `unknown_image`)."""
    # an entry repeated as is counts once (`duplicate_image_id` for the repeats); different images sharing one id
    # are all rejected (`conflicting_image_id`): which of them an annotation belongs to cannot be known
    entries, rejected_image_ids = {}, set()
    for im in images:
        if not _image_ok(im) or _bad_file_name(im["file_name"]):
            d = im if isinstance(im, dict) else {}
            name = d.get("file_name", "")
            reason = "bad_file_name" if isinstance(name, str) and name and _image_ok(im) else "malformed_image_entry"
            rejects.image(name, d.get("id", ""), reason)
            if _is_int(d.get("id")):
                rejected_image_ids.add(d["id"])
            continue
        image_id, first = im["id"], entries.get(im["id"])
        if first is not None and _same_image(first[0], im):
            rejects.image(im["file_name"], image_id, "duplicate_image_id")
        elif first is not None or image_id in rejected_image_ids:
            if first is not None:
                del entries[image_id]
                rejects.image(first[0]["file_name"], image_id, "conflicting_image_id")
            rejects.image(im["file_name"], image_id, "conflicting_image_id")
            rejected_image_ids.add(image_id)
        else:
            entries[image_id] = (im, os.path.join(images_dir, im["file_name"]), [], float(im["width"]),
                                 float(im["height"]))
    return entries, rejected_image_ids


def _same_image(a: dict, b: dict) -> bool:
    return (a["file_name"], a["width"], a["height"]) == (b["file_name"], b["width"], b["height"])


def _annotation_ok(a) -> bool:
    return (type(a) is dict and type(a.get("id")) is int and type(a.get("image_id")) is int
            and type(a.get("category_id")) is int and type(a.get("bbox")) is list and len(a["bbox"]) == 4
            and all(type(v) in _NUMBER for v in a["bbox"])
            and a.get("iscrowd", 0) in (0, 1) and type(a.get("iscrowd", 0)) is not float)


def _same_annotation(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("image_id", "category_id", "bbox", "iscrowd"))


def _annotation_reason(a, entries, rejected_image_ids, label_of, first_with_id) -> str:
    """Why annotation `a` is dropped ("" when its image and category are known and its box numbers finite)."""
    if not _annotation_ok(a):
        return "malformed_annotation"
    if not all(math.isfinite(v) for v in a["bbox"]):  # NaN/Infinity: Python's json.dump writes them
        return "non_finite_box"
    if a["id"] in first_with_id and _same_annotation(first_with_id[a["id"]], a):
        return "duplicate_annotation"  # the same annotation listed twice
    if a["image_id"] not in entries:
        # an image entry that was rejected has its own row; its boxes are counted, not called unknown
        return "image_rejected" if a["image_id"] in rejected_image_ids else "unknown_image"
    if a["category_id"] not in label_of:
        return "unknown_category"
    return ""


def _attach_annotations(annotations, entries, rejected_image_ids, label_of, min_size, rejects: _Rejects) -> int:
    """Append each valid box to its image's list in `entries` as (annotation, training box, clipped): the box
    clipped to the image as rounded xywh (None when under min_box_size: evaluation-only); reject the rest. Returns
    how many kept annotations reuse an id another one has (all are kept: the written ground truth renumbers them).

    One pass, no object per annotation but that tuple: the common well-formed entry is checked inline (the same
    rules as `_annotation_ok`, `_annotation_reason` and `_clip_box`, which odd entries still go through)."""
    first_with_id: dict[int, dict] = {}
    shared = 0
    isfinite, number = math.isfinite, _NUMBER
    for pos, a in enumerate(annotations):
        if type(a) is dict:
            aid, iid, cid, bbox = a.get("id"), a.get("image_id"), a.get("category_id"), a.get("bbox")
            crowd = a.get("iscrowd", 0)
        else:
            aid = None
        if (type(aid) is int and type(iid) is int and type(cid) is int and type(bbox) is list and len(bbox) == 4
                and crowd in (0, 1) and type(crowd) is not float):
            x, y, w, h = bbox
            if not (type(x) in number and type(y) in number and type(w) in number and type(h) in number):
                reason = "malformed_annotation"
            elif not (isfinite(x) and isfinite(y) and isfinite(w) and isfinite(h)):
                reason = "non_finite_box"
            elif aid in first_with_id and _same_annotation(first_with_id[aid], a):
                reason = "duplicate_annotation"
            else:
                target = entries.get(iid)
                if target is None:
                    reason = "image_rejected" if iid in rejected_image_ids else "unknown_image"
                elif cid not in label_of:
                    reason = "unknown_category"
                else:
                    reason, box, clipped = _clip_box(bbox, target[3], target[4], min_size)
        else:
            reason = "malformed_annotation"
        if reason and reason != "box_too_small":  # too small: still ground truth (its row comes with its image)
            ok_id = isinstance(a, dict) and _is_int(a.get("id"))
            image_id = a.get("image_id", "") if isinstance(a, dict) else ""
            file = entries[image_id][1] if _is_int(image_id) and image_id in entries else ""
            rejects.annotation(file, image_id, a["id"] if ok_id else f"#{pos}", reason)
            continue
        if aid in first_with_id:
            shared += 1
        else:
            first_with_id[aid] = a
        target[2].append((a, box, clipped))
    return shared


def _clip_box(bbox, width: float, height: float, min_size: float) -> tuple[str, list | None, bool]:
    """("", the box clipped to the image as rounded xywh, whether it was clipped), ("box_too_small", None, False),
    or (why the box is invalid, None, False)."""
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "degenerate_box", None, False
    x1, y1 = max(0.0, float(x)), max(0.0, float(y))
    x2, y2 = min(width, float(x + w)), min(height, float(y + h))
    if x2 <= x1 or y2 <= y1:
        return "box_outside_image", None, False
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return "box_too_small", None, False
    clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
    return "", [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], clipped


def _kept_images(entries: dict, probed: list, label_of: dict, counts: dict, rejects: _Rejects, aux_bases=None):
    """(index lines, GT images, GT annotations as JSON chunks) of the images whose header matches their JSON size
    (and whose aux image, with `aux_bases`, is usable); an image whose file is bad or of another size is dropped
    with its boxes. Lines and annotations are serialised image by image (bytes, not dicts, are held)."""
    lines, gt_images, gt_chunks = [], [], []
    n_gt = n_train = n_crowd = n_clipped = 0
    dump = _dump_bytes
    for k, ((image_id, (im, file, boxes, _, _)), result) in enumerate(zip(entries.items(), probed, strict=True)):
        w, h, reason = result[:3]
        if not reason and (w, h) != (im["width"], im["height"]):
            reason = "size_mismatch"
        reason = reason or (result[3] if aux_bases is not None else "")
        if reason:
            rejects.image(file, image_id, reason)
            for b in boxes:  # dropped with their image
                rejects.annotation(file, image_id, b[0]["id"], "image_rejected")
            continue
        train = [b for b in boxes if b[1] is not None]
        crowd = [int(b[0].get("iscrowd", 0)) for b in train]
        category_ids = [b[0]["category_id"] for b in train]
        n_train += len(train)
        n_crowd += sum(crowd)
        n_clipped += sum(b[2] for b in train)
        line = {"image_id": image_id, "file": file, "width": im["width"], "height": im["height"],
                "boxes": [b[1] for b in train], "category_ids": category_ids,
                "labels": [label_of[c] for c in category_ids], "iscrowd": crowd,
                "ann_ids": [b[0]["id"] for b in train]}
        if aux_bases is not None:
            line["aux"] = file if result[4] == "" else aux_bases[k] + result[4]
        lines.append(dump(line) + b"\n")
        if len(train) < len(boxes):
            for b in boxes:  # too small to learn from, yet scored against: the official ground truth has them
                if b[1] is None:
                    rejects.annotation(file, image_id, b[0]["id"], "box_too_small")
        gt_images.append(im)
        if boxes:
            gt_chunks.append(dump([_gt_annotation(b[0], n_gt + j) for j, b in enumerate(boxes, 1)])[1:-1])
            n_gt += len(boxes)
    counts["images_kept"] = len(gt_images)
    counts["annotations_kept"], counts["crowd_kept"], counts["boxes_clipped"] = n_train, n_crowd, n_clipped
    counts["gt_annotations"] = n_gt
    return lines, gt_images, gt_chunks


def _gt_annotation(a: dict, new_id: int) -> dict:
    """The evaluation entry of annotation `a`: its own box and area, as the official scoring reads them, under id
    `new_id` (1..N: both COCO evaluators take id 0 for 'unmatched'); `source_id` is the dataset's id."""
    x, y, w, h = a["bbox"]
    area = a.get("area")
    if type(area) is float:  # the common cases first; finite_or_none's rules
        area = area if area > 0 and area != math.inf else w * h
    else:
        area = finite_or_none(area)
        area = area if area is not None and area > 0 else w * h
    return {"id": new_id, "source_id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"],
            "bbox": [x, y, w, h], "area": area,
            "iscrowd": int(a.get("iscrowd", 0))}


def _probe_start(paths: list, pool, workers: int):
    """Start reading the headers of `paths` (or of (path, aux base, N) items: `probe_with_aux`): large chunks
    across the pool (in-process when few)."""
    many = probe_many if not paths or isinstance(paths[0], str) else probe_many_with_aux
    if pool is None or len(paths) < INLINE_BELOW:
        return many(paths)
    chunk = max(1000, math.ceil(len(paths) / (workers * 4)))
    return pool.map_async(many, [paths[i:i + chunk] for i in range(0, len(paths), chunk)])


def probe_many_with_aux(items: list[tuple]) -> list[tuple[int, int, str, str, str]]:
    """`probe_with_aux` over a chunk of (path, aux base or None, N) items (one index process's unit of work)."""
    return [probe_with_aux(*item) for item in items]


def probe_with_aux(path: str, aux_base: str | None, n: int) -> tuple[int, int, str, str, str]:
    """(width, height, image reason, aux reason, aux extension): the aux image is `aux_base` + .png or .npy with
    N channels at the image's size, or (no aux_base) channels 3.. of an .npy image of 3 + N (extension "")."""
    hd = read_header(path)
    w, h, reason = main_image(hd)
    if reason:
        return w, h, reason, "", ""
    if aux_base is None:
        if hd.kind != "npy":
            return w, h, "", "aux_missing", ""
        return w, h, "", "" if hd.channels == 3 + n else CHANNELS_MISMATCH, ""
    found = [ext for ext in AUX_EXTS if os.path.isfile(aux_base + ext)]
    if len(found) != 1:
        return w, h, "", "aux_missing" if not found else "aux_ambiguous", ""
    aux = read_header(aux_base + found[0])
    if aux.reason or aux.kind not in ("png", "npy") or aux.bits not in (8, 16):
        return w, h, "", "aux_bad_header", found[0]
    if (aux.width, aux.height) != (w, h):
        return w, h, "", "aux_size_mismatch", found[0]
    return w, h, "", "" if aux.channels == n else "aux_channels_mismatch", found[0]


def _probe_finish(pending) -> list[tuple[int, int, str]]:
    if isinstance(pending, list):
        return pending
    return [r for part in pending.get() for r in part]
