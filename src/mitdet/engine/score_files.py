"""Scoring any COCO results file against any COCO ground truth with the evaluate stage's scoring code.

A predictions file is a COCO results list, or the COCO-format object `mitdet predict` writes (its `images` are
matched to the ground truth's by file_name, and only those images are scored). Every entry is checked first, so a
bad one is named with its position instead of failing inside COCOeval: in bulk, on the arrays the scorer takes
(the file is read with orjson), and entry by entry only to name the first bad one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mitdet.engine.scoring import Scores, _member, _no_gc, detection_arrays, load_coco, score
from mitdet.errors import DataError
from mitdet.io import write_json
from mitdet.params import DEFAULT_SCORER

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; the stdlib parser is the fallback
    orjson = None

log = logging.getLogger(__name__)

RESULT_FIELDS = ("image_id", "category_id", "bbox", "score")
# COCOeval.summarize()'s twelve lines: (AP or AR, IoU, area, max detections)
STAT_LINES = [("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
              ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
              ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
              ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100)]
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
NO_SPEED = {"images_per_s": None, "ms_per_image": None}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def entry_problem(r: Any, image_ids: set[int], category_ids: set[int]) -> str | None:
    """What is wrong with one COCO result entry against the ground truth's ids, or None."""
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not an object with {', '.join(RESULT_FIELDS)}"
    missing = [k for k in RESULT_FIELDS if k not in r]
    if missing:
        return f"lacks {', '.join(missing)} (a COCO result needs {', '.join(RESULT_FIELDS)})"
    if not _is_int(r["image_id"]) or r["image_id"] not in image_ids:
        return f"image_id {_short(r['image_id'])} is not an image of the ground truth"
    if not _is_int(r["category_id"]) or r["category_id"] not in category_ids:
        return f"category_id {_short(r['category_id'])} is not a category of the ground truth"
    box = r["bbox"]
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        return f"bbox {_short(box)} is not [x, y, width, height]"
    if not all(_is_number(v) for v in box):
        return f"bbox {_short(box)} holds a non-finite number"
    if any(v < 0 for v in box):
        return f"bbox {_short(box)} has a negative value (boxes are [x, y, width, height] in pixels, all >= 0)"
    if not _is_number(r["score"]):
        return f"score {_short(r['score'])} is not a finite number"
    return None


def check_results(results: list, gt: dict, where: str) -> None:
    """A DataError naming the first entry of `results` that COCOeval cannot score against `gt`."""
    image_ids = {im["id"] for im in gt["images"]}
    category_ids = {c["id"] for c in gt["categories"]}
    for i, r in enumerate(results):
        problem = entry_problem(r, image_ids, category_ids)
        if problem:
            raise DataError(f"entry [{i}]: {problem}", where=where,
                            fix="score predictions against the ground truth of the images they were made on")


def checked_arrays(results: list, gt: dict, where: str):
    """The scorer's arrays of `results`, checked in bulk against `gt` (check_results' rules); a DataError naming
    the first bad entry (found entry by entry, only then) if one fails."""
    try:
        det = detection_arrays(results, where)
    except DataError:
        check_results(results, gt, where)  # this module's message for the first bad entry
        raise
    image_ids = np.unique(np.array([im["id"] for im in gt["images"]], dtype=np.int64))
    category_ids = np.unique(np.array([c["id"] for c in gt["categories"]], dtype=np.int64))
    bad = ~_member(det.image_id, image_ids)[0] | ~_member(det.category_id, category_ids)[0] | (det.bbox < 0).any(1)
    if bad.any():
        check_results(results, gt, where)
        raise DataError(f"entry [{int(np.argmax(bad))}] cannot be scored", where=where)  # pragma: no cover
    return det


def read_json_fast(path: str | os.PathLike) -> Any:
    """A JSON file's value: orjson with the cyclic GC paused; the stdlib parser where orjson refuses the file (it
    holds NaN or Infinity, which Python writes: the entry holding one is then named by the checks)."""
    raw = Path(path).read_bytes()
    with _no_gc():
        if orjson is not None:
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
        try:
            return json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"not valid JSON ({err})", where=str(path)) from None


def _gt_ids_by_name(gt: dict) -> tuple[dict[str, int], dict[str, int]]:
    """GT image ids by file_name, and by base name where that is unique."""
    by_name = {str(im.get("file_name")): im["id"] for im in gt["images"] if "file_name" in im}
    bases = Counter(os.path.basename(n) for n in by_name)
    by_base = {os.path.basename(n): i for n, i in by_name.items() if bases[os.path.basename(n)] == 1}
    return by_name, by_base


def _map_images(doc: dict, gt: dict, where: str) -> dict[int, int]:
    """Prediction image id -> GT image id, matched by file_name (or base name): a mitdet predict file."""
    by_name, by_base = _gt_ids_by_name(gt)
    mapping = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise DataError(f"images[{i}] needs an integer `id` and a string `file_name`; got {_short(im)}",
                            where=where)
        name = im["file_name"]
        gt_id = by_name.get(name, by_base.get(os.path.basename(name)))
        if gt_id is None:
            raise DataError(f"images[{i}]: file_name {name!r} is not an image of the ground truth", where=where,
                            fix="predict the ground truth's own image files (the folder its file_name values "
                                "are relative to)")
        mapping[im["id"]] = gt_id
    return mapping


def read_predictions(path: str | os.PathLike, gt: dict):
    """(the scorer's arrays of the COCO results, with the ground truth's image ids; the image ids to score or
    None for all), checked."""
    where = str(path)
    if not Path(path).is_file():
        raise DataError("no such predictions file", where=where)
    data = read_json_fast(path)
    image_ids = None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list) and isinstance(data.get("images"), list):
        mapping = _map_images(data, gt, where)
        results = []
        for i, a in enumerate(data["annotations"]):
            image_id = a.get("image_id") if isinstance(a, dict) else None
            if not _is_int(image_id) or image_id not in mapping:
                shown = _short(image_id) if isinstance(a, dict) else f"missing (entry {_short(a)})"
                raise DataError(f"annotations[{i}]: image_id {shown} is not an id of the file's `images`",
                                where=where)
            results.append({**{k: a.get(k) for k in RESULT_FIELDS if k in a}, "image_id": mapping[a["image_id"]]})
        where, image_ids = f"{where}: annotations", sorted(set(mapping.values()))
    elif isinstance(data, list):
        results = data
    else:
        kind = type(data).__name__ if not isinstance(data, dict) else "object without `images` and `annotations`"
        raise DataError(f"is a JSON {kind}, not a COCO results list ([{{image_id, category_id, bbox, score}}, ...])",
                        where=where)
    return checked_arrays(results, gt, where), image_ids


def score_file(gt_path: str | os.PathLike, predictions_path: str | os.PathLike,
               scorer: str = DEFAULT_SCORER) -> Scores:
    """Scores of a predictions file against a COCO ground truth file; `summary` holds COCOeval's 12 stats."""
    t0 = time.perf_counter()
    # the GC paused throughout: the parsed entries are freed (read_predictions returns arrays) before it runs
    # again, so none of its passes walks the millions of objects the file became
    with _no_gc():
        coco_gt = load_coco(gt_path, scorer)
        t1 = time.perf_counter()
        detections, image_ids = read_predictions(predictions_path, coco_gt.dataset)
        t2 = time.perf_counter()
        if not len(detections.image_id):
            log.warning("%s holds no detections: every class with ground truth scores AP 0", predictions_path)
        scores = score(coco_gt, detections, scorer=scorer, image_ids=image_ids)
    rest = {k: v for k, v in scores.timings.items() if k not in ("load_ground_truth", "read_json")}
    scores.timings = {"load_ground_truth": t1 - t0, "read_json_and_check": t2 - t1, **rest}
    return scores


def stats_text(summary: dict[str, float | None]) -> str:
    """The 12 stats in COCOeval.summarize()'s layout (n/a where COCOeval says -1: no GT in that range)."""
    lines = []
    for key, (kind, iou, area, dets) in zip(STAT_KEYS, STAT_LINES, strict=True):
        title = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
        value = summary.get(key)
        shown = "n/a" if value is None else f"{value:0.3f}"
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {shown}")
    return "\n".join(lines)


def write_score_outputs(scores: Scores, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """eval.json (the evaluate stage's keys; speed, params and GFLOPs null: unknown here) and per_class.json."""
    from mitdet.engine.evaluate import eval_metrics  # here: that module imports torch (seconds), scoring does not

    out_dir = Path(out_dir)
    metrics = eval_metrics(scores, NO_SPEED, None, None, scores.num_images)
    write_json(out_dir / "eval.json", metrics)
    write_json(out_dir / "per_class.json", scores.per_class)
    return out_dir / "eval.json", out_dir / "per_class.json"
