"""The YOLO-format source: `images/` + `labels/` folders converted into COCO-format JSON for build_index.

Labels are `<stem>.txt` in a parallel folder (`labels/sub/x.txt` for `images/sub/x.jpg`), one box a line:
`class x_center y_center width height`, normalised to [0, 1], classes 0-indexed into `data.yolo.names` (COCO
category id = class + 1). Image sizes come from headers only (JPEG/PNG headers, the .npy header); images are not
copied: the JSON points at the user's folders. Malformed lines and unusable images are counted and skipped, each
with a row in `skipped.csv` beside the JSON. Same inputs and seed -> byte-identical files.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from mitdet.data.headers import probe
from mitdet.errors import DataError
from mitdet.io import csv_text, write_json, write_text
from mitdet.params import YoloParams, YoloSplit
from mitdet.paths import RAW_DIR

log = logging.getLogger(__name__)
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".npy"})
OUT_DIR = f"{RAW_DIR}/yolo/annotations"
SKIPPED_CSV = "skipped.csv"
SKIPPED_COLUMNS = ["split", "file", "line", "reason", "text"]
COORD_TOL = 0.01  # box edges up to 1% outside [0, 1] (exporters' rounding) are clipped; further out: skipped


def prepare_yolo(cfg: YoloParams, seed: int, root: str | Path = ".") -> tuple[dict, dict]:
    """Convert data.yolo's folders into `OUT_DIR/instances_<split>.json`; return (manifest splits, conversion)."""
    root = Path(root)
    sources = {"train": ("data.yolo.train", cfg.train)}
    if cfg.val is not None:
        sources["val"] = ("data.yolo.val", cfg.val)
    sources.update({name: (f"data.yolo.tests.{name}", split) for name, split in cfg.tests.items()})
    for key, split in sources.values():
        _require_folders(root, key, split)
    scans = {name: _scan(root, split) for name, (_, split) in sources.items()}
    if cfg.val is None:
        scans["train"], scans["val"] = _seeded_split(scans["train"], cfg.val_fraction, seed)
        sources["val"] = ("data.yolo.train", cfg.train)
    order = ["train", "val", *cfg.tests]
    tmp, out = root / RAW_DIR / "yolo" / ".annotations.tmp", root / OUT_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    conversion, rows, splits = {}, [], {}
    for name in order:
        split = sources[name][1]
        coco, counts, skipped = convert_split(root, split, scans[name], cfg.names, cfg.negatives)
        write_json(tmp / f"instances_{name}.json", coco, indent=None)
        rows += [[name, *r] for r in skipped]
        conversion[name] = counts
        splits[name] = {"images": split.images, "annotations": f"{OUT_DIR}/instances_{name}.json",
                        **({"aux": split.aux} if split.aux is not None else {})}
        log.info("%s", summary(name, counts))
    write_text(tmp / SKIPPED_CSV, csv_text(SKIPPED_COLUMNS, rows))
    shutil.rmtree(out, ignore_errors=True)  # written aside, then swapped in: no stale split survives
    os.replace(tmp, out)
    return splits, conversion


def summary(name: str, c: dict) -> str:
    """One line: what was kept and what was skipped of one split."""
    neg = c["negatives"]
    skipped = ", ".join(f"{n} {r}" for r, n in {**c["images_skipped"], **c["lines_skipped"]}.items()) or "nothing"
    return (f"yolo {name}: {c['images_kept']}/{c['images']} images, {c['annotations']} boxes; negatives "
            f"{neg['kept']} kept, {neg['dropped']} dropped; {c['labels_without_image']} label files without image; "
            f"skipped {skipped} (see {OUT_DIR}/{SKIPPED_CSV})")


def _require_folders(root: Path, key: str, split: YoloSplit) -> None:
    for field, folder in (("images", split.images), ("labels", split.labels), ("aux", split.aux)):
        if folder is not None and not (root / folder).is_dir():
            raise DataError("not found or not a folder", where=f"{key}.{field} = {root / folder}",
                            fix="set it in params.yaml (relative to the project root, or absolute) or create it")


def _list_files(folder: Path, exts) -> list[str]:
    """Sorted paths relative to `folder` (with `/`) of the regular files below it whose suffix is in `exts`."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link loop: walked once
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        rel = os.path.relpath(dirpath, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out += [prefix + n for n in filenames if os.path.splitext(n)[1].lower() in exts]
    return sorted(out)


def _scan(root: Path, split: YoloSplit) -> dict:
    """{"images": [(image id, relative image path, relative label path or None)], "orphans": [label paths]}."""
    images = _list_files(root / split.images, IMAGE_EXTS)
    labels = {os.path.splitext(p)[0]: p for p in _list_files(root / split.labels, {".txt"})}
    stems = Counter(os.path.splitext(p)[0] for p in images)
    items = [(i + 1, p, labels.get(os.path.splitext(p)[0])) for i, p in enumerate(images)]
    orphans = sorted(set(labels) - set(stems))
    return {"images": items, "orphans": [labels[s] for s in orphans],
            "shared_stem": {s for s, n in stems.items() if n > 1}}


def _seeded_split(scan: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """A seeded shuffle of the image files: the first round(n * fraction) go to val (at least one of each when n >= 2)."""
    items = scan["images"]
    n = len(items)
    n_val = min(max(int(math.floor(n * fraction + 0.5)), 1), n - 1) if n >= 2 else 0
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = {**scan, "images": [it for i, it in enumerate(items) if i not in val]}
    return train, {**scan, "images": [it for i, it in enumerate(items) if i in val], "orphans": []}


def convert_split(root: Path, split: YoloSplit, scan: dict, names: list[str], negatives: str):
    """(COCO dict, counts, skipped rows [file, line, reason, text]) of one split's images and labels."""
    counts = {"images": len(scan["images"]), "images_kept": 0, "images_skipped": Counter(),
              "negatives": {"no_label_file": 0, "empty_label_file": 0, "kept": 0, "dropped": 0},
              "labels_without_image": len(scan["orphans"]), "lines": 0, "lines_kept": 0,
              "lines_skipped": Counter(), "annotations": 0}
    images, anns, rows = [], [], []
    for image_id, rel, label in scan["images"]:
        image_file = os.path.join(split.images, rel)
        if os.path.splitext(rel)[0] in scan["shared_stem"]:
            reason, sample = "shared_stem", None  # a.jpg and a.png: which one a.txt labels cannot be known
        else:
            reason, sample = _read_sample(root, image_file, None if label is None else os.path.join(split.labels, label),
                                          len(names))
        if sample is not None:
            reason = _count_sample(sample, counts, rows, negatives)
        if reason:
            if reason != "negative_dropped":
                counts["images_skipped"][reason] += 1
                rows.append([image_file, "", reason, ""])
            continue
        w, h, boxes = sample["width"], sample["height"], sample["boxes"]
        images.append({"id": image_id, "file_name": rel, "width": w, "height": h})
        for cls, bbox in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": bbox,
                         "area": round(bbox[2] * bbox[3], 3), "iscrowd": 0})
        counts["images_kept"] += 1
    rows += [[os.path.join(split.labels, p), "", "label_without_image", ""] for p in scan["orphans"]]
    counts["annotations"] = len(anns)
    counts["images_skipped"] = dict(sorted(counts["images_skipped"].items()))
    counts["lines_skipped"] = dict(sorted(counts["lines_skipped"].items()))
    coco = {"info": {"description": "YOLO-format labels converted by mitdet prepare_data"}, "licenses": [],
            "images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    return coco, counts, rows


def _count_sample(sample: dict, counts: dict, rows: list, negatives: str) -> str:
    """Add one readable sample's lines to `counts` and `rows`; why the image is left out ("" when kept)."""
    counts["lines"] += sample["lines"]
    counts["lines_kept"] += len(sample["boxes"])
    for line, reason, text in sample["skipped"]:
        counts["lines_skipped"][reason] += 1
        rows.append([sample["label"], line, reason, text])
    if sample["negative"]:
        counts["negatives"][sample["negative"]] += 1
        counts["negatives"]["kept" if negatives == "keep" else "dropped"] += 1
        return "" if negatives == "keep" else "negative_dropped"
    return "" if sample["boxes"] else "all_lines_skipped"  # a labelled image whose boxes are all bad: not a negative


def _read_sample(root: Path, image_file: str, label_file: str | None, k: int) -> tuple[str, dict | None]:
    """("", {width, height, boxes, skipped, lines, negative, label}) or (why the image is unusable, None)."""
    w, h, reason = probe(os.path.join(root, image_file))
    if reason:
        return reason, None
    sample = {"width": w, "height": h, "boxes": [], "skipped": [], "lines": 0, "negative": "", "label": label_file}
    if label_file is None:
        sample["negative"] = "no_label_file"
        return "", sample
    try:
        text = (root / label_file).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return "unreadable_label_file", None
    seen = set()
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        sample["lines"] += 1
        reason, box = parse_line(fields, k, w, h)
        key = None if reason else (box[0], *box[1])
        if not reason and key in seen:
            reason = "duplicate_line"
        if reason:
            sample["skipped"].append((n, reason, line.strip()[:80]))
        else:
            seen.add(key)
            sample["boxes"].append(box)
    if not sample["lines"]:
        sample["negative"] = "empty_label_file"
    return "", sample


def parse_line(fields: list[str], k: int, width: int, height: int) -> tuple[str, tuple | None]:
    """("", (class, [x, y, w, h] pixels)) for a valid `class xc yc w h` line, else (reason, None)."""
    if len(fields) != 5:
        return "wrong_field_count", None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return "not_a_number", None
    if not all(math.isfinite(v) for v in values):
        return "not_a_number", None
    cls, xc, yc, bw, bh = values
    if not cls.is_integer() or not 0 <= cls < k:
        return "unknown_class", None
    if bw <= 0 or bh <= 0:
        return "zero_size", None
    x1, y1, x2, y2 = xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2
    if min(x1, y1) < -COORD_TOL or max(x2, y2) > 1 + COORD_TOL:
        return "outside_image", None
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
    if x2 <= x1 or y2 <= y1:
        return "outside_image", None
    box = [round(x1 * width, 3), round(y1 * height, 3), round((x2 - x1) * width, 3), round((y2 - y1) * height, 3)]
    if box[2] <= 0 or box[3] <= 0:
        return "zero_size", None
    return "", (int(cls), box)
