"""COCO bbox metrics (pycocotools or faster-coco-eval, same numbers) and the per-class table people read.

`score()` runs COCOeval against the original ground truth (crowd regions ignored as COCO does) and turns its
accumulated arrays into a summary, per-class AP/recall and PR curves, with null (never NaN) where a class or an
area range has no ground truth.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mitdet.data.index import check_coco, read_coco
from mitdet.io import finite_or_none

log = logging.getLogger(__name__)

SCORERS = ("pycocotools", "faster_coco_eval")
# COCOeval.stats index of each summary key (the first 9 of its 12 bbox stats)
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
PR_IOUS = (0.5, 0.75)  # the IoU thresholds of the PR curves
AGGREGATE_N = 10  # top10_mAP / bottom10_mAP


@dataclass
class Scores:
    """COCO bbox metrics of one set of detections.

    summary: AP..AR100 (float, or None where COCOeval says -1: no GT in that area range).
    per_class: category name -> {AP, AP50, AP75, recall, num_preds, num_gt}; the four metrics are None for a
    class without (non-crowd) ground truth in the scored images.
    aggregates: top10_mAP, bottom10_mAP, ap_spread over classes with GT (None when there is none).
    pr_curves: rows {"iou", "recall", "precision"} averaged over classes with GT (area all, 100 detections).
    """
    summary: dict[str, float | None]
    per_class: dict[str, dict[str, Any]]
    aggregates: dict[str, float | None]
    pr_curves: list[dict[str, float]] = field(default_factory=list)
    num_images: int = 0
    num_detections: int = 0
    scorer: str = "pycocotools"


def _backend(scorer: str):
    """(COCO, COCOeval) classes of the chosen scorer."""
    if scorer == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if scorer == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise ValueError(f"evaluate.scorer = {scorer!r} is not known; choose one of: {', '.join(SCORERS)}")


def load_ground_truth(gt_json: str | Path | dict) -> dict:
    """The COCO ground truth as a dict (a private copy), checked for what COCOeval reads (a DataError if not)."""
    fix = "run `dvc repro build_index`"
    if isinstance(gt_json, dict):
        gt = check_coco(copy.deepcopy(gt_json), "ground truth dict", strict=True, fix=fix)
    else:
        gt = read_coco(gt_json, strict=True, fix=fix)
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and "bbox" in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt


def _check_results(results: list[dict], image_ids: set[int], where: str = "results") -> None:
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise ValueError(f"{where}[{i}]: missing field(s) {', '.join(missing)}; a COCO result needs "
                             "image_id, category_id, bbox [x, y, w, h], score")
        if len(r["bbox"]) != 4:
            raise ValueError(f"{where}[{i}]: bbox must be [x, y, w, h]; got {r['bbox']!r}")
    unknown = {r["image_id"] for r in results} - image_ids
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} image_id(s) not in the ground truth (e.g. {sorted(unknown)[:5]}); "
                         "score predictions against the instances_<split>.json of the split they were made on")


def load_coco(gt_json: str | Path | dict, scorer: str = "pycocotools"):
    """The ground truth as the scorer's indexed COCO object: load it once and pass it to `score` many times."""
    COCO, _ = _backend(scorer)
    gt = load_ground_truth(gt_json)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    return coco_gt


def score(gt_json, results: list[dict], scorer: str = "pycocotools",
          image_ids: Iterable[int] | None = None) -> Scores:
    """COCO bbox metrics of `results` (COCO results list) against `gt_json`.

    `gt_json`: a path, a dict (copied), or the COCO object `load_coco(..., scorer)` returned (used as is, so a
    loop that scores often loads it once). `image_ids` restricts scoring to those images (results on other
    images are dropped), e.g. the N images a quick validation ran on. Empty results give AP 0 for every class
    with GT and a logged warning.
    """
    COCO, COCOeval = _backend(scorer)
    coco_gt = gt_json if hasattr(gt_json, "createIndex") else load_coco(gt_json, scorer)
    gt = coco_gt.dataset
    all_ids = {img["id"] for img in gt["images"]}
    if image_ids is None:
        ids = sorted(all_ids)
    else:
        ids = sorted({int(i) for i in image_ids})
        unknown = set(ids) - all_ids
        if unknown:
            raise ValueError(f"image_ids: {len(unknown)} id(s) not in the ground truth (e.g. {sorted(unknown)[:5]})")
    keep = set(ids)
    _check_results(results, all_ids)
    # copies: loadRes adds id/area/segmentation to each result dict
    dets = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results if r["image_id"] in keep]
    cat_ids = {c["id"] for c in gt["categories"]}
    stray = Counter(d["category_id"] for d in dets if d["category_id"] not in cat_ids)
    if stray:
        log.warning("%d detection(s) have category ids absent from the ground truth (%s); COCOeval ignores them",
                    sum(stray.values()), sorted(stray)[:10])

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            log.warning("no detections to score on %d image(s): AP is 0 for every class with ground truth", len(ids))
            # pycocotools' loadRes raises on an empty list; an empty result set is still a valid one
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return _scores_from_eval(ev, gt, dets, keep, scorer)


def _mean_valid(a: np.ndarray) -> float | None:
    """Mean of the entries > -1 (COCOeval's 'no ground truth' marker), None when there is none."""
    v = a[a > -1]
    return float(np.mean(v)) if v.size else None


def _scores_from_eval(ev, gt: dict, dets: list[dict], keep: set[int], scorer: str) -> Scores:
    stats = [float(s) for s in ev.stats[:len(SUMMARY_KEYS)]]
    summary = {k: (None if s < 0 else finite_or_none(s)) for k, s in zip(SUMMARY_KEYS, stats, strict=True)}

    p = ev.params
    precision = np.asarray(ev.eval["precision"])  # [T iou, R recall points, K classes, A areas, M maxDets]
    recall = np.asarray(ev.eval["recall"])        # [T, K, A, M]
    iou = np.asarray(p.iouThrs)
    t50, t75 = int(np.argmin(np.abs(iou - 0.5))), int(np.argmin(np.abs(iou - 0.75)))
    a_all = list(p.areaRngLbl).index("all")
    m100 = list(p.maxDets).index(max(p.maxDets))

    names = {c["id"]: c["name"] for c in gt["categories"]}
    num_gt = Counter(a["category_id"] for a in gt["annotations"]
                     if a["image_id"] in keep and not a.get("iscrowd", 0) and not a.get("ignore", 0))
    num_preds = Counter(d["category_id"] for d in dets)

    per_class: dict[str, dict[str, Any]] = {}
    with_gt: list[int] = []
    for k, cat_id in enumerate(p.catIds):
        prec = precision[:, :, k, a_all, m100]
        ap = _mean_valid(prec)
        row = {
            "AP": ap,
            "AP50": _mean_valid(prec[t50]),
            "AP75": _mean_valid(prec[t75]),
            "recall": _mean_valid(recall[:, k, a_all, m100]),
            "num_preds": int(num_preds.get(cat_id, 0)),
            "num_gt": int(num_gt.get(cat_id, 0)),
        }
        if ap is not None:
            with_gt.append(k)
        name = names.get(cat_id, str(cat_id))
        if name in per_class:  # two categories sharing a name: keep both, the id tells them apart
            name = f"{name} (id {cat_id})"
        per_class[name] = row

    aps = sorted((r["AP"] for r in per_class.values() if r["AP"] is not None), reverse=True)
    aggregates = {
        "top10_mAP": float(np.mean(aps[:AGGREGATE_N])) if aps else None,
        "bottom10_mAP": float(np.mean(aps[-AGGREGATE_N:])) if aps else None,
        "ap_spread": float(aps[0] - aps[-1]) if aps else None,
    }

    pr_rows = []
    if with_gt:
        for thr in PR_IOUS:
            t = int(np.argmin(np.abs(iou - thr)))
            curve = precision[t, :, with_gt, a_all, m100]  # [classes with GT, R] (fancy index moves K first)
            curve = np.where(curve > -1, curve, 0.0).mean(axis=0)
            pr_rows += [{"iou": thr, "recall": round(float(r), 2), "precision": float(v)}
                        for r, v in zip(p.recThrs, curve, strict=True)]
    return Scores(summary=summary, per_class=per_class, aggregates=aggregates, pr_curves=pr_rows,
                  num_images=len(keep), num_detections=len(dets), scorer=scorer)


def per_class_table(scores: Scores, top_k: int = 10) -> str:
    """The per-class table: top and bottom `top_k` classes by AP, then the aggregate lines."""
    rows = [(n, r) for n, r in scores.per_class.items() if r["AP"] is not None]
    rows.sort(key=lambda nr: (-nr[1]["AP"], nr[0]))
    no_gt = [n for n, r in scores.per_class.items() if r["AP"] is None]
    width = max([len(n) for n, _ in rows] + [12])
    head = (f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'preds':>6}  {'GT':>6}  "
            f"{'recall':>6}  {'preds/GT':>8}")

    def line(name, r):
        ratio = f"{r['num_preds'] / r['num_gt']:8.2f}" if r["num_gt"] else f"{'-':>8}"
        return (f"{name:<{width}}  {r['AP']:6.3f}  {r['AP50']:6.3f}  {r['num_preds']:6d}  {r['num_gt']:6d}  "
                f"{r['recall']:6.3f}  {ratio}")

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    out = []
    k = min(top_k, len(rows))
    out += [f"TOP PERFORMING CLASSES (top {k} by AP)", head, "-" * len(head)]
    out += [line(n, r) for n, r in rows[:k]]
    bottom = rows[max(k, len(rows) - top_k):][::-1]  # worst first, none repeated from the top table
    out += ["", f"CLASSES NEEDING ATTENTION (bottom {len(bottom)} by AP)", head, "-" * len(head)]
    out += [line(n, r) for n, r in bottom] or ["(every class with GT is listed above)"]
    s, a = scores.summary, scores.aggregates
    out += ["", "recall = AR@100 averaged over IoU 0.50:0.95; preds/GT = detections submitted per GT object "
                "(not a recall)",
            f"mAP (AP@[.50:.95]) {fmt(s['AP'])}   AP50 {fmt(s['AP50'])}   AP75 {fmt(s['AP75'])}",
            f"APs {fmt(s['APs'])}   APm {fmt(s['APm'])}   APl {fmt(s['APl'])}   "
            f"AR1 {fmt(s['AR1'])}   AR10 {fmt(s['AR10'])}   AR100 {fmt(s['AR100'])}",
            f"top{AGGREGATE_N}_mAP {fmt(a['top10_mAP'])}   bottom{AGGREGATE_N}_mAP {fmt(a['bottom10_mAP'])}   "
            f"ap_spread {fmt(a['ap_spread'])}",
            f"classes with GT {len(rows)}/{len(scores.per_class)}   images {scores.num_images}   "
            f"detections {scores.num_detections}   scorer {scores.scorer}"]
    if no_gt:
        out.append(f"no GT in these images (AP null): {', '.join(no_gt[:20])}{' ...' if len(no_gt) > 20 else ''}")
    return "\n".join(out)
