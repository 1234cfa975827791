"""build_index: validate images by their headers and annotations by rule; write the index the trainer reads.

Outputs (under `out_dir`): `<split>.jsonl` (one kept image a line), `categories.json`, `instances_<split>.json`
(the evaluation ground truth: kept images and annotations, crowd regions included), `rejected.csv` (one row per
dropped image or box) and `source.json` (the raw manifest's source and per-split fingerprint, so that the index
changes whenever the raw data does). Bad files and boxes are counted and skipped; a malformed annotation JSON is
an error. Nothing under `out_dir` holds timings: an unchanged dataset indexed again gives byte-identical files.

rejected.csv: an image-level row (one per rejected image entry) has an empty `ann_id`; every annotation-level row
has a non-empty one (the annotation's id, or `#<position in the JSON list>` when it has no integer id). Boxes on a
rejected image are annotation rows with reason `image_rejected`, so per split
annotations_kept + sum(annotations_rejected) == annotations.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitdet.data.headers import probe, probe_many
from mitdet.io import atomic_path, read_json, write_json, write_text
from mitdet.params import IndexParams

try:  # 5-10x faster JSON for COCO-sized files; strict (refuses NaN) like mitdet.io.read_json
    import orjson
except ImportError:  # pragma: no cover - the plain library gives the same results, slower
    orjson = None

SPLITS = ("train", "val")
REJECTED_COLUMNS = ["split", "file", "image_id", "ann_id", "reason"]
INLINE_BELOW = 2000  # fewer images than this are probed in-process: a pool costs more than it saves


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


@dataclass
class SplitIndex:
    split: str
    images: list[ImageRecord]
    categories: list[Category]


class IndexBuildError(ValueError):
    """An annotation file or manifest that cannot be indexed at all (names the file and the field)."""


# ------------------------------------------------------------------------------------------------- loading
def load_split(index_dir: str | Path, split: str, root: str | Path | None = None) -> SplitIndex:
    """Read `<index_dir>/<split>.jsonl` and `categories.json` (written by build_index).

    Image paths in the index are relative to the project root (or absolute); with `root` given, relative ones
    are joined to it, otherwise they are left relative to the working directory (the stages run from the root).
    """
    index_dir = Path(index_dir)
    path = index_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index for split '{split}'; run the build_index stage "
                                f"(`dvc repro build_index`) first")
    categories = [Category(int(c["id"]), str(c["name"]), int(c["label"])) for c in read_json(index_dir / "categories.json")]
    images = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                boxes = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
            except (ValueError, KeyError) as err:
                raise IndexBuildError(f"{path}:{n}: not an index line ({err}); rebuild the index") from None
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            file = r["file"] if root is None or os.path.isabs(r["file"]) else os.path.join(root, r["file"])
            images.append(ImageRecord(
                image_id=int(r["image_id"]), file=file, width=int(r["width"]), height=int(r["height"]),
                boxes=boxes, labels=np.asarray(r["labels"], np.int64), category_ids=np.asarray(r["category_ids"], np.int64),
                iscrowd=np.asarray(r["iscrowd"], bool)))
    return SplitIndex(split=split, images=images, categories=categories)


# ------------------------------------------------------------------------------------------------ building
def build_index(manifest_path: str | Path, params: IndexParams, out_dir: str | Path, metrics_path: str | Path | None = None,
                root: str | Path = ".") -> dict:
    """Index every split the manifest names; write the outputs atomically and return the metrics."""
    t_start = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    manifest = read_json(root / manifest_path)
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise IndexBuildError(f"{manifest_path}: no `splits` mapping; run prepare_data again")
    for split in SPLITS:
        if split not in splits or not isinstance(splits[split], dict) or not {"images", "annotations"} <= set(splits[split]):
            raise IndexBuildError(f"{manifest_path}: split '{split}' is missing (it needs `images` and `annotations`); "
                              f"run prepare_data again or fix data.local.{split}")
    cocos = {s: _load_coco(root / splits[s]["annotations"]) for s in SPLITS}
    categories = _categories(cocos, {s: splits[s]["annotations"] for s in SPLITS})
    label_of = {c.id: c.label for c in categories}

    pool = None
    if params.workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(params.workers)
    rejected: list[list] = []
    metrics: dict = {"categories": len(categories), "workers": params.workers, "min_box_size": params.min_box_size, "splits": {}}
    try:
        for split in SPLITS:
            t0 = time.perf_counter()
            lines, gt, counts = _index_split(split, splits[split]["images"], cocos[split], label_of, params, pool,
                                             rejected, root)
            gt["categories"] = [{"id": c.id, "name": c.name} for c in categories]
            write_text(out_dir / f"{split}.jsonl", "".join(lines))
            write_text(out_dir / f"instances_{split}.json", _dumps(gt))
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
    with atomic_path(out_dir / "rejected.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(REJECTED_COLUMNS)
            w.writerows(rejected)
    seconds = time.perf_counter() - t_start
    total = sum(m["images"] for m in metrics["splits"].values())
    metrics["seconds"] = round(seconds, 4)
    metrics["images_per_s"] = round(total / seconds, 1) if seconds > 0 else None
    if metrics_path is not None:
        write_json(root / metrics_path if not Path(metrics_path).is_absolute() else metrics_path, metrics)
    return metrics


def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found; run prepare_data or fix the path in params.yaml")
    try:
        coco = _read_json_fast(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise IndexBuildError(f"{path}: malformed annotation JSON ({err}); fix or re-download the file") from None
    if not isinstance(coco, dict):
        raise IndexBuildError(f"{path}: expected a COCO object with `images`, `annotations`, `categories`; got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise IndexBuildError(f"{path}: field `{key}` is missing or not a list; this is not a COCO instances file")
    return coco


def _categories(cocos: dict[str, dict], paths: dict[str, str]) -> list[Category]:
    """The union of the splits' categories, sorted by id, labelled 1..K; a conflicting name is an error."""
    names: dict[int, str] = {}
    where: dict[int, str] = {}
    for split, coco in cocos.items():
        for i, c in enumerate(coco["categories"]):
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise IndexBuildError(f"{paths[split]}: categories[{i}] needs an integer `id` and a string `name`; got {c!r}")
            cid = int(c["id"])
            if cid in names and names[cid] != c["name"]:
                raise IndexBuildError(f"category id {cid} is '{names[cid]}' in {where[cid]} but '{c['name']}' in "
                                  f"{paths[split]}; the splits must share one category list")
            names[cid], where[cid] = c["name"], paths[split]
    if not names:
        raise IndexBuildError(f"{paths['train']}: no categories; a detection dataset needs at least one")
    return [Category(cid, names[cid], label) for label, cid in enumerate(sorted(names), start=1)]


def _read_json_fast(path: Path):
    if orjson is None:
        return read_json(path)
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _dumps(value) -> str:
    """One JSON line (NaN cannot occur: every number was checked finite)."""
    if orjson is None:
        return json.dumps(value, separators=(",", ":"), allow_nan=False) + "\n"
    return orjson.dumps(value).decode() + "\n"


_NUMBER = (int, float)  # exact types: bool is not a number here


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _index_split(split, images_dir, coco, label_of, params, pool, rejected, root):
    counts = {"images": len(coco["images"]), "images_kept": 0, "annotations": len(coco["annotations"]),
              "annotations_kept": 0, "crowd_kept": 0, "boxes_clipped": 0}
    img_reasons, ann_reasons = Counter(), Counter()

    def reject_image(file, image_id, reason):
        img_reasons[reason] += 1
        rejected.append([split, file, image_id, "", reason])  # empty ann_id: an image-level row

    def reject_annotation(file, image_id, ann_id, reason):
        ann_reasons[reason] += 1
        rejected.append([split, file, image_id, ann_id, reason])

    # 1. image entries: well-formed, unique ids, a plain relative file name
    entries, rejected_image_ids = {}, set()
    for im in coco["images"]:
        ok = (type(im) is dict and type(im.get("id")) is int and type(im.get("file_name")) is str and im["file_name"]
              and type(im.get("width")) is int and type(im.get("height")) is int and im["width"] > 0 and im["height"] > 0)
        if not ok:
            reject_image(im.get("file_name", "") if isinstance(im, dict) else "", im.get("id", "") if isinstance(im, dict) else "",
                         "malformed_image_entry")
            if isinstance(im, dict) and _is_int(im.get("id")):
                rejected_image_ids.add(im["id"])
            continue
        name = im["file_name"]
        if name[0] in "/\\" or (".." in name and ".." in Path(name).parts):
            reject_image(name, im["id"], "malformed_image_entry")
            rejected_image_ids.add(im["id"])
            continue
        if im["id"] in entries:  # the first entry keeps the id (and its boxes)
            reject_image(name, im["id"], "duplicate_image_id")
            continue
        entries[im["id"]] = (im, os.path.join(images_dir, name), [])

    # 2. headers, in parallel (started now, collected after the annotations: the two overlap)
    files = [e[1] for e in entries.values()]
    probe_paths = files if str(root) in ("", ".") else [os.path.join(root, f) for f in files]
    pending = _probe_start(probe_paths, pool, params.workers)

    # 3. annotations: well-formed, known image and category, box clipped to the JSON size and large enough
    ann_seen = set()
    min_size = params.min_box_size
    for pos, a in enumerate(coco["annotations"]):
        ok = (type(a) is dict and type(a.get("id")) is int and type(a.get("image_id")) is int
              and type(a.get("category_id")) is int and type(a.get("bbox")) is list and len(a["bbox"]) == 4
              and all(type(v) in _NUMBER for v in a["bbox"]) and math.isfinite(sum(a["bbox"]))
              and a.get("iscrowd", 0) in (0, 1) and type(a.get("iscrowd", 0)) is not float)
        image_id = a.get("image_id", "") if isinstance(a, dict) else ""
        target = entries.get(image_id) if ok else None
        file = target[1] if target else ""
        reason = ""
        if not ok:
            reason = "malformed_annotation"
        elif a["id"] in ann_seen:
            reason = "duplicate_annotation_id"
        elif target is None:
            # an image entry that was rejected has its own row; its boxes are counted, not called unknown
            reason = "image_rejected" if image_id in rejected_image_ids else "unknown_image"
        elif a["category_id"] not in label_of:
            reason = "unknown_category"
        else:
            im = target[0]
            x, y, w, h = a["bbox"]
            x1, y1 = max(0.0, float(x)), max(0.0, float(y))
            x2, y2 = min(float(im["width"]), float(x + w)), min(float(im["height"]), float(y + h))
            if w <= 0 or h <= 0:
                reason = "degenerate_box"
            elif x2 <= x1 or y2 <= y1:
                reason = "box_outside_image"
            elif x2 - x1 < min_size or y2 - y1 < min_size:
                reason = "box_too_small"
        if reason:
            ann_id = a["id"] if isinstance(a, dict) and _is_int(a.get("id")) else f"#{pos}"
            reject_annotation(file, image_id, ann_id, reason)
            continue
        ann_seen.add(a["id"])
        clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
        target[2].append((a, [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], clipped))

    # 4. header results: an image whose file is bad, or whose size differs from the JSON, is dropped (with its boxes)
    lines, gt_images, gt_anns = [], [], []
    for (image_id, (im, file, anns)), (w, h, reason) in zip(entries.items(), _probe_finish(pending)):
        if not reason and (w, h) != (im["width"], im["height"]):
            reason = "size_mismatch"
        if reason:
            reject_image(file, image_id, reason)
            for a, _, _ in anns:  # dropped with their image
                reject_annotation(file, image_id, a["id"], "image_rejected")
            continue
        counts["images_kept"] += 1
        counts["annotations_kept"] += len(anns)
        crowd = [int(a.get("iscrowd", 0)) for a, _, _ in anns]
        counts["crowd_kept"] += sum(crowd)
        counts["boxes_clipped"] += sum(c for _, _, c in anns)
        lines.append(_dumps({
            "image_id": image_id, "file": file, "width": im["width"], "height": im["height"],
            "boxes": [b for _, b, _ in anns], "category_ids": [a["category_id"] for a, _, _ in anns],
            "labels": [label_of[a["category_id"]] for a, _, _ in anns], "iscrowd": crowd,
            "ann_ids": [a["id"] for a, _, _ in anns]}))
        gt_images.append(im)
        for (a, b, _), c in zip(anns, crowd):
            area = a.get("area")
            gt_anns.append({"id": a["id"], "image_id": image_id, "category_id": a["category_id"], "bbox": b,
                            "area": float(area) if _is_num(area) and area > 0 else b[2] * b[3], "iscrowd": c})
    counts["images_rejected"] = dict(sorted(img_reasons.items()))
    counts["annotations_rejected"] = dict(sorted(ann_reasons.items()))
    gt = {"info": coco.get("info", {}) if isinstance(coco.get("info"), dict) else {},
          "licenses": coco.get("licenses", []) if isinstance(coco.get("licenses"), list) else [],
          "images": gt_images, "annotations": gt_anns}
    return lines, gt, counts


def _probe_start(paths: list[str], pool, workers: int):
    """Start reading the headers of `paths`: large chunks across the pool (in-process when few)."""
    if pool is None or len(paths) < INLINE_BELOW:
        return [probe(p) for p in paths]
    chunk = max(1000, math.ceil(len(paths) / (workers * 4)))
    return pool.map_async(probe_many, [paths[i:i + chunk] for i in range(0, len(paths), chunk)])


def _probe_finish(pending) -> list[tuple[int, int, str]]:
    if isinstance(pending, list):
        return pending
    return [r for part in pending.get() for r in part]
