"""build_index: validate images by their headers and annotations by rule; write the index the trainer reads.

Outputs (under `out_dir`): `<split>.jsonl` (one kept image a line: the training targets), `categories.json`,
`instances_<split>.json` (the evaluation ground truth), `rejected.csv` (one row per dropped image or box) and
`source.json` (the raw manifest's source and per-split fingerprint, so that the index changes whenever the raw data
does). Bad files and boxes are counted and skipped; a malformed annotation JSON is a DataError naming the file and
the entry (`coco_stream.read_for_index`, through `check_coco`: the one COCO shape check, also the scorer's).
Nothing under `out_dir` holds timings: an unchanged dataset indexed again gives byte-identical files.

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
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from mitdet.data.headers import CHANNELS_MISMATCH, main_image, probe_many, read_header
from mitdet.data.coco_stream import NotStreamable, read_for_index
from mitdet.data.index import _NUMBER, AUX_EXTS, REPREPARE, SPLITS, Category, _is_int, _short, orjson
from mitdet.errors import DataError
from mitdet.io import atomic_path, clean_json, finite_or_none, read_json, write_json
from mitdet.params import IndexParams

log = logging.getLogger(__name__)
REJECTED_COLUMNS = ["split", "file", "image_id", "ann_id", "reason"]
INLINE_BELOW = 2000  # fewer images than this are probed in-process: a pool costs more than it saves


def build_index(manifest_path: str | Path, params: IndexParams, out_dir: str | Path, metrics_path: str | Path | None = None,
                root: str | Path = ".") -> dict:
    """Index every split the manifest names; write the outputs atomically and return the metrics.

    The cyclic garbage collector is paused throughout: nothing here makes reference cycles, and on a COCO-sized
    file its passes over the millions of parsed objects cost more than the parse itself (orjson.loads of 400 MB:
    13.6 s with it, 5.6 s without)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            return _build_index(manifest_path, params, out_dir, metrics_path, root, stream=True)
        except NotStreamable as err:  # an odd layout or malformed text: whole parses say what is wrong, and where
            log.info("%s; indexing again from whole parses", err)
            return _build_index(manifest_path, params, out_dir, metrics_path, root, stream=False)
    finally:
        if paused:
            gc.enable()


def _build_index(manifest_path, params: IndexParams, out_dir, metrics_path, root, stream: bool) -> dict:
    t_start = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    manifest, splits, tests = _read_manifest(root, manifest_path)
    names = [*SPLITS, *tests]
    # the header readers are forked before the JSON is parsed, so they share none of its pages with this process
    # (measured at 100k images: no clear change in time either way)
    pool = None
    if params.workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(params.workers)
    rejected: list[list] = []
    try:
        cocos = {s: read_for_index(root / splits[s]["annotations"], stream=stream,
                                   fix=f"fix the file (data.local.{s if s in SPLITS else 'tests.' + s}.annotations) "
                                       f"or {REPREPARE} again") for s in names}
        categories = _categories({s: cocos[s][0] for s in SPLITS}, {s: splits[s]["annotations"] for s in SPLITS})
        label_of = {c.id: c.label for c in categories}
        gt_categories = [{"id": c.id, "name": c.name} for c in categories]
        metrics: dict = {"categories": len(categories), "workers": params.workers,
                         "min_box_size": params.min_box_size,
                         **({"aux_channels": params.aux_channels} if params.aux_channels else {}), "splits": {}}
        for split in names:
            t0 = time.perf_counter()
            counts = _index_split(split, splits[split], *cocos.pop(split), label_of, gt_categories, params, pool,
                                  rejected, root, out_dir)  # popped: freed once indexed
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


def _index_split(split, paths, coco, annotations, label_of, categories, params, pool, rejected, root,
                 out_dir: Path) -> dict:
    """Index one split: write `<split>.jsonl` and `instances_<split>.json` under `out_dir`, append its rejected
    rows to `rejected`, return its counts. `annotations`: the split's, iterated once (`coco`'s own list is empty);
    `categories`: the ground truth's category list."""
    images_dir, n_aux = paths["images"], params.aux_channels
    counts = {"images": len(coco["images"]), "images_kept": 0, "annotations": 0,
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
    boxes = array("d")
    counts["annotations"], counts["annotation_ids_shared"] = _attach_annotations(
        annotations, entries, rejected_image_ids, label_of, params.min_box_size, rejects, boxes)
    round_boxes(boxes)
    probed = _probe_finish(pending)
    verdicts = _image_verdicts(entries, probed, aux_bases)
    # instances_<split>.json as `_dumps` of {info, licenses, images, annotations, categories} writes it
    info = coco.get("info", {}) if isinstance(coco.get("info"), dict) else {}
    licenses = coco.get("licenses", []) if isinstance(coco.get("licenses"), list) else []
    gt_images = [e[0] for e, verdict in zip(entries.values(), verdicts, strict=True) if not verdict]
    gt_head = b"".join((b'{"info":', _dump_bytes(info), b',"licenses":', _dump_bytes(licenses), b',"images":',
                        _dump_bytes(gt_images), b',"annotations":['))
    del gt_images
    with atomic_path(out_dir / f"{split}.jsonl") as lines_tmp, atomic_path(out_dir / f"instances_{split}.json") as gt_tmp:
        with open(lines_tmp, "wb", buffering=1 << 20) as lines, open(gt_tmp, "wb", buffering=1 << 20) as gt:
            gt.write(gt_head)
            _write_images(entries, verdicts, probed, boxes, label_of, counts, rejects, aux_bases, lines, gt)
            gt.write(b'],"categories":' + _dump_bytes(categories) + b"}\n")
    counts["images_rejected"] = dict(sorted(rejects.images.items()))
    counts["annotations_rejected"] = dict(sorted(rejects.annotations.items()))
    return counts


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


# What is kept of a valid annotation in place of its parsed dict, a plain tuple (785k of them on COCO train2017):
# (id, image_id, category_id, iscrowd as the file has it (absent: None), the file's own bbox (the evaluation's),
#  the evaluation area, the training box's number in the split's box array (None: under min_box_size), clipped)
_ID, _IMAGE_ID, _CATEGORY, _CROWD, _BBOX, _AREA, _BOX, _CLIPPED = range(8)


def _same_annotation(first: tuple, image_id, category_id, bbox, iscrowd) -> bool:
    return (first[_IMAGE_ID], first[_CATEGORY], first[_BBOX], first[_CROWD]) == (image_id, category_id, bbox, iscrowd)


def _attach_annotations(annotations: Iterable, entries, rejected_image_ids, label_of, min_size,
                        rejects: _Rejects, boxes: array) -> tuple[int, int]:
    """Append each valid annotation to its image's list in `entries` as a kept tuple (above), its training box to
    `boxes` (4 floats: xywh clipped to the image, unrounded); reject the rest. Returns (how many annotations there
    were, how many kept ones reuse an id another one has: all are kept, and the written ground truth renumbers them).

    Only the kept tuple outlives the loop, not the parsed dict: with `annotations` read a chunk at a time, the
    parsed file and what is kept of it are never in memory together."""
    first_with_id: dict[int, tuple] = {}
    shared = 0
    isfinite, number, extend = math.isfinite, _NUMBER, boxes.extend
    pos = -1
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
            elif aid in first_with_id and _same_annotation(first_with_id[aid], iid, cid, bbox, a.get("iscrowd")):
                reason = "duplicate_annotation"
            else:
                target = entries.get(iid)
                if target is None:
                    reason = "image_rejected" if iid in rejected_image_ids else "unknown_image"
                elif cid not in label_of:
                    reason = "unknown_category"
                else:
                    reason, box, clipped = _clip_box(x, y, w, h, target[3], target[4], min_size)
        else:
            reason = "malformed_annotation"
        if reason and reason != "box_too_small":  # too small: still ground truth (its row comes with its image)
            ok_id = isinstance(a, dict) and _is_int(a.get("id"))
            image_id = a.get("image_id", "") if isinstance(a, dict) else ""
            file = entries[image_id][1] if _is_int(image_id) and image_id in entries else ""
            rejects.annotation(file, image_id, a["id"] if ok_id else f"#{pos}", reason)
            continue
        number_of_box = None
        if box is not None:
            number_of_box = len(boxes) >> 2
            extend(box)
        kept = (aid, target[0]["id"], cid, a.get("iscrowd"), bbox, _gt_area(a.get("area"), w, h), number_of_box,
                clipped)
        if aid in first_with_id:
            shared += 1
        else:
            first_with_id[aid] = kept
        target[2].append(kept)
    return pos + 1, shared


def _gt_area(area, w, h):
    """The file's area when it is a positive finite number (finite_or_none's rules), else the box's w * h."""
    if type(area) is float:  # the common case first
        return area if area > 0 and area != math.inf else w * h
    area = finite_or_none(area)
    return area if area is not None and area > 0 else w * h


def _clip_box(x, y, w, h, width: float, height: float, min_size: float) -> tuple[str, tuple | None, bool]:
    """("", the box clipped to the image as xywh floats, whether it was clipped), ("box_too_small", None, False),
    or (why the box is invalid, None, False)."""
    if w <= 0 or h <= 0:
        return "degenerate_box", None, False
    x1, y1, x2, y2 = float(x), float(y), float(x + w), float(y + h)
    x1, y1 = (x1 if x1 > 0.0 else 0.0), (y1 if y1 > 0.0 else 0.0)  # max/min, without their call cost
    x2, y2 = (x2 if x2 < width else width), (y2 if y2 < height else height)
    if x2 <= x1 or y2 <= y1:
        return "box_outside_image", None, False
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return "box_too_small", None, False
    return "", (x1, y1, x2 - x1, y2 - y1), (x1, y1, x2, y2) != (x, y, x + w, y + h)


def round_boxes(values: array, ndigits: int = 3, chunk: int = 1 << 18) -> None:
    """Round every value of `values` (an array of doubles) in place to exactly what `round(v, ndigits)` gives, in
    bulk (`chunk` values at a time, so the temporaries stay small).

    rint(v * 10^n) / 10^n is Python's correctly rounded result unless v * 10^n lies within its float error of a
    half (or is too large for that error to stay small): those few values are left to `round` itself."""
    scale = 10.0 ** ndigits
    every = np.frombuffer(values, dtype=np.float64)  # a view: writing it writes `values`
    for first in range(0, len(every), chunk):
        flat = every[first:first + chunk]
        scaled = flat * scale
        out = np.rint(scaled) / scale
        doubtful = np.flatnonzero((np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6) | ~(np.abs(scaled) < 1e9))
        out[doubtful] = [round(v, ndigits) for v in flat[doubtful].tolist()]
        flat[:] = out


def _image_verdicts(entries: dict, probed: list, aux_bases) -> list[str]:
    """Per image entry: "" when it is kept, else why not: its header's reason, `size_mismatch` when the file's
    size is not the JSON's, or (with `aux_bases`) its aux image's reason."""
    verdicts = []
    for (im, *_), result in zip(entries.values(), probed, strict=True):
        w, h, reason = result[:3]
        if not reason and (w, h) != (im["width"], im["height"]):
            reason = "size_mismatch"
        verdicts.append(reason or (result[3] if aux_bases is not None else ""))
    return verdicts


def _write_images(entries: dict, verdicts: list, probed: list, boxes: array, label_of: dict, counts: dict,
                  rejects: _Rejects, aux_bases, lines, gt) -> None:
    """Write each kept image's index line to `lines` and its ground truth annotations to `gt` (comma-separated);
    a rejected image is dropped with its boxes. Each image's kept tuples are let go once written."""
    n_gt = n_train = n_crowd = n_clipped = n_kept = 0
    dump = _dump_bytes
    for k, ((image_id, (im, file, kept, _, _)), reason) in enumerate(zip(entries.items(), verdicts, strict=True)):
        if reason:
            rejects.image(file, image_id, reason)
            for b in kept:  # dropped with their image
                rejects.annotation(file, image_id, b[_ID], "image_rejected")
            continue
        n_kept += 1
        train = [b for b in kept if b[_BOX] is not None]
        crowd = [int(b[_CROWD] or 0) for b in train]
        category_ids = [b[_CATEGORY] for b in train]
        n_train += len(train)
        n_crowd += sum(crowd)
        n_clipped += sum(b[_CLIPPED] for b in train)
        line = {"image_id": image_id, "file": file, "width": im["width"], "height": im["height"],
                "boxes": [boxes[4 * b[_BOX]:4 * b[_BOX] + 4].tolist() for b in train], "category_ids": category_ids,
                "labels": [label_of[c] for c in category_ids], "iscrowd": crowd, "ann_ids": [b[_ID] for b in train]}
        if aux_bases is not None:
            line["aux"] = file if probed[k][4] == "" else aux_bases[k] + probed[k][4]
        lines.write(dump(line) + b"\n")
        if len(train) < len(kept):
            for b in kept:  # too small to learn from, yet scored against: the official ground truth has them
                if b[_BOX] is None:
                    rejects.annotation(file, image_id, b[_ID], "box_too_small")
        if kept:
            gt.write((b"," if n_gt else b"") + dump([_gt_annotation(b, n_gt + j) for j, b in enumerate(kept, 1)])[1:-1])
            n_gt += len(kept)
        kept.clear()
    counts["images_kept"] = n_kept
    counts["annotations_kept"], counts["crowd_kept"], counts["boxes_clipped"] = n_train, n_crowd, n_clipped
    counts["gt_annotations"] = n_gt


def _gt_annotation(b: tuple, new_id: int) -> dict:
    """The evaluation entry of a kept annotation: its own box and area, as the official scoring reads them, under
    id `new_id` (1..N: both COCO evaluators take id 0 for 'unmatched'); `source_id` is the dataset's id."""
    aid, image_id, category_id, iscrowd, bbox, area = b[:6]
    return {"id": new_id, "source_id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": area, "iscrowd": int(iscrowd or 0)}


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
