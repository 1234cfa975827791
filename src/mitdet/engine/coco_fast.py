"""COCOeval's bbox evaluate + accumulate over numpy arrays: the `fast` scorer's core.

pycocotools' rules, computed for all (image, category) pairs at once instead of one Python object per
annotation, per pair and per area range:

- per pair, the detections best score first (ties in the order given), at most max(maxDets); the ground truth in
  the order given, the ones ignored in an area range (crowd regions, `area` outside it) after the others;
- greedy matching, one detection rank at a time across every pair: each detection takes, among the free ground
  truth with IoU >= the threshold, a non-ignored one if it can, then the highest IoU, then the later one (as
  pycocotools' loop does); crowd regions are never used up; a matched detection is ignored where its ground truth
  is, an unmatched one where its box area is outside the area range;
- per class, one sort of its detections by score (ties: image order, then rank in the pair), cumulative true and
  false positives, pycocotools' interpolated precision at the 101 recall points, and recall at each maxDets.

Cells pycocotools marks -1 (no ground truth in that class and area range) are -1 here. Precision is computed at
the largest maxDets only (every COCO stat reads it there); its other maxDets columns are -1. The tests check the
precision and recall arrays against pycocotools' on adversarial inputs (crowd regions, classes without GT, images
without detections, tied scores, more than 100 detections in a pair, area ranges).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Params:
    """The evaluation parameters, under COCOeval's Params names (what scoring reads), pycocotools' bbox defaults."""
    iouThrs: np.ndarray = field(default_factory=lambda: np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1,
                                                                    endpoint=True))
    recThrs: np.ndarray = field(default_factory=lambda: np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1,
                                                                    endpoint=True))
    areaRng: tuple = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))
    areaRngLbl: tuple = ("all", "small", "medium", "large")
    maxDets: tuple = (1, 10, 100)


@dataclass
class Pairs:
    """Ground truth and detections keyed by pair = image index * n_cats + category index, sorted by pair
    (detections: then best first, at most max(maxDets) each; `rank` is the position in the pair)."""
    n_cats: int
    gt_pair: np.ndarray
    gt_bbox: np.ndarray  # [n, 4] x, y, w, h
    gt_area: np.ndarray  # the annotations' `area` field
    gt_crowd: np.ndarray  # bool
    dt_pair: np.ndarray
    dt_bbox: np.ndarray
    dt_score: np.ndarray
    dt_rank: np.ndarray


def group_pairs(n_cats: int, gt: tuple, dt: tuple, max_det: int) -> tuple[Pairs, np.ndarray, np.ndarray]:
    """(Pairs, the gt rows it holds, the detection rows it holds) of gt = (image index, category index, bbox,
    area, iscrowd) and dt = (image index, category index, bbox, score); rows in the order given."""
    g_img, g_cat, g_bbox, g_area, g_crowd = gt
    d_img, d_cat, d_bbox, d_score = dt
    g_pair = g_img.astype(np.int64) * n_cats + g_cat
    g_rows = np.argsort(g_pair, kind="stable")
    d_pair = d_img.astype(np.int64) * n_cats + d_cat
    d_rows = np.lexsort((np.arange(len(d_pair)), -d_score, d_pair))
    rank = ranks(d_pair[d_rows])
    d_rows, rank = d_rows[rank < max_det], rank[rank < max_det]  # COCOeval drops the rest before matching
    pairs = Pairs(n_cats, g_pair[g_rows], g_bbox[g_rows], g_area[g_rows], g_crowd[g_rows].astype(bool),
                  d_pair[d_rows], d_bbox[d_rows], d_score[d_rows], rank)
    return pairs, g_rows, d_rows


def ranks(sorted_keys: np.ndarray) -> np.ndarray:
    """Each entry's position among the equal keys before it (keys sorted)."""
    n = len(sorted_keys)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if n else np.zeros(0, np.int64)
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of row-aligned [x, y, w, h] boxes, pycocotools' bbIou operations in its order (a crowd region's union
    is the detection's area)."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def outside(area: np.ndarray, params: Params) -> np.ndarray:
    """[A, n]: whether each area is outside each area range (COCOeval's test: below lo or above hi)."""
    return np.stack([(area < lo) | (area > hi) for lo, hi in params.areaRng]).reshape(len(params.areaRng), -1)


# ------------------------------------------------------------------------------------------ matching
@dataclass
class Candidates:
    """Detection-GT entries of one pair with IoU >= the lowest threshold, sorted by detection."""
    det: np.ndarray  # detection index (into Pairs' dt arrays)
    gt: np.ndarray  # GT index (into Pairs' gt arrays)
    iou: np.ndarray
    ignored: np.ndarray  # [A, n]: the GT is ignored in that area range


def candidates(p: Pairs, params: Params) -> Candidates:
    lo = np.searchsorted(p.gt_pair, p.dt_pair, "left")
    n_gt = np.searchsorted(p.gt_pair, p.dt_pair, "right") - lo
    det = np.repeat(np.arange(len(p.dt_pair)), n_gt)
    gt = np.repeat(lo - np.cumsum(n_gt) + n_gt, n_gt) + np.arange(len(det))  # lo + position among the pair's GT
    iou = bbox_iou(p.dt_bbox[det], p.gt_bbox[gt], p.gt_crowd[gt])
    keep = iou >= min(params.iouThrs[0], 1 - 1e-10)
    det, gt, iou = det[keep], gt[keep], iou[keep]
    return Candidates(det, gt, iou, p.gt_crowd[gt][None] | outside(p.gt_area[gt], params))


def priorities(c: Candidates) -> np.ndarray:
    """[A, n]: each entry's rank among its detection's entries in pycocotools' preference (higher first-chosen):
    not ignored, then IoU, then later in the pair's ground truth."""
    first = np.searchsorted(c.det, c.det, "left")
    key = np.empty(c.ignored.shape, np.int64)
    for a in range(len(c.ignored)):
        order = np.lexsort((c.gt, c.iou, ~c.ignored[a], c.det))
        key[a, order] = np.arange(len(order)) - first[order]
    return key


def match(p: Pairs, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """(matched [A, T, n], ignored [A, T, n]) of the detections, COCOeval's dtMatches > 0 and dtIgnore."""
    thrs = np.minimum(np.asarray(params.iouThrs), 1 - 1e-10)
    c = candidates(p, params)
    key = priorities(c)
    gts, g_local = np.unique(c.gt, return_inverse=True)
    shape = (len(params.areaRng), len(thrs))
    taken = np.zeros(shape + (len(gts),), bool)
    matched, ignored = np.zeros(shape + (len(p.dt_pair),), bool), np.zeros(shape + (len(p.dt_pair),), bool)
    crowd = p.gt_crowd[c.gt]
    step = np.argsort(p.dt_rank[c.det], kind="stable")  # stays sorted by detection within a rank
    bounds = np.searchsorted(p.dt_rank[c.det][step], np.arange(max(params.maxDets) + 1))
    for r in range(max(params.maxDets)):  # one detection of each pair at a time, all pairs at once
        e = step[bounds[r]:bounds[r + 1]]
        if len(e):
            _match_rank(e, c, key, crowd, g_local, thrs, taken, matched, ignored)
    unmatched_outside = ~matched & outside(p.dt_bbox[:, 2] * p.dt_bbox[:, 3], params)[:, None, :]
    return matched, ignored | unmatched_outside


def _match_rank(e, c: Candidates, key, crowd, g_local, thrs, taken, matched, ignored) -> None:
    """Match the detections of one rank (entries `e`, grouped by detection), updating the arrays in place."""
    dd, gl = c.det[e], g_local[e]
    segs = np.flatnonzero(np.r_[True, dd[1:] != dd[:-1]])
    free = (c.iou[e] >= thrs[:, None])[None] & (crowd[e] | ~taken[:, :, gl])  # [A, T, entries]
    k = np.where(free, key[:, e][:, None, :], -1)
    best = np.maximum.reduceat(k, segs, axis=2)
    seg_of = np.repeat(np.arange(len(segs)), np.diff(np.r_[segs, len(e)]))
    ai, ti, ei = np.nonzero(free & (k == best[:, :, seg_of]))
    taken[ai, ti, gl[ei]] = True
    matched[ai, ti, dd[ei]] = True
    ignored[ai, ti, dd[ei]] = c.ignored[ai, e[ei]]


# ------------------------------------------------------------------------------------------ accumulation
def gt_counts(p: Pairs, params: Params) -> np.ndarray:
    """[K, A]: ground truth that is not ignored, per class and area range (COCOeval's npig)."""
    cat = p.gt_pair % p.n_cats
    ok = ~(p.gt_crowd[None] | outside(p.gt_area, params))
    return np.stack([np.bincount(cat[ok[a]], minlength=p.n_cats) for a in range(len(params.areaRng))], axis=1)


def accumulate(p: Pairs, matched: np.ndarray, ignored: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, K, A, M] (at max(maxDets); -1 in the other M columns) and recall [T, K, A, M]."""
    K, A, T, M, R = p.n_cats, len(params.areaRng), len(params.iouThrs), len(params.maxDets), len(params.recThrs)
    npig = gt_counts(p, params)
    valid = npig > 0  # pycocotools: -1 where npig is 0, whether or not the class has detections
    cat = p.dt_pair % K
    tp, fp = matched & ~ignored, ~matched & ~ignored
    recall = -np.ones((T, K, A, M))
    for mi, m in enumerate(params.maxDets):
        a, t, d = np.nonzero(tp & (p.dt_rank < m))
        hits = np.bincount((a * T + t) * K + cat[d], minlength=A * T * K).reshape(A, T, K)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall[:, :, :, mi] = np.where(valid.T[:, None, :], hits / npig.T[:, None, :], -1).transpose(1, 2, 0)
    # pycocotools' order within a class: score, best first; ties in image order, then rank in the pair
    order = np.lexsort((p.dt_rank, p.dt_pair // K, -p.dt_score, cat))
    bounds = np.searchsorted(cat[order], np.arange(K + 1))
    precision = -np.ones((T, R, K, A, M))
    for k in np.flatnonzero(valid.any(axis=1)):
        sel = order[bounds[k]:bounds[k + 1]]
        curves = class_precision(tp[:, :, sel], fp[:, :, sel], npig[k], np.asarray(params.recThrs))
        for a in np.flatnonzero(valid[k]):
            precision[:, :, k, a, -1] = curves[a]
    return precision, recall


def class_precision(tp: np.ndarray, fp: np.ndarray, npig_k: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """[A, T, R]: one class's interpolated precision at the recall points, from its detections' tp/fp [A, T, n]
    in score order (pycocotools' cumulative sums, running maximum from the end and left search)."""
    tps = np.cumsum(tp, axis=2, dtype=np.int64).astype(float)
    fps = np.cumsum(fp, axis=2, dtype=np.int64).astype(float)
    n = tps.shape[2]
    out = np.zeros(tps.shape[:2] + (len(rec_thrs),))
    if n == 0:
        return out
    pr = np.maximum.accumulate((tps / (fps + tps + np.spacing(1)))[:, :, ::-1], axis=2)[:, :, ::-1]
    for a, t in np.ndindex(*tps.shape[:2]):
        if npig_k[a]:
            inds = np.searchsorted(tps[a, t] / npig_k[a], rec_thrs, side="left")
            ok = inds < n
            out[a, t, ok] = pr[a, t, inds[ok]]
    return out


def evaluate(p: Pairs, params: Params | None = None) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluate() + accumulate() for bbox: (precision [T, R, K, A, M], recall [T, K, A, M])."""
    params = params or Params()
    matched, ignored = match(p, params)
    return accumulate(p, matched, ignored, params)
