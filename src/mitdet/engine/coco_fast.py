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
    by_score = np.argsort(-d_score, kind="stable")  # ties in the order given
    d_rows = by_score[np.argsort(d_pair[by_score], kind="stable")]  # by pair, best first (two stable sorts)
    rank = ranks(d_pair[d_rows])
    d_rows, rank = d_rows[rank < max_det], rank[rank < max_det]  # COCOeval drops the rest before matching
    pairs = Pairs(n_cats, g_pair[g_rows], g_bbox[g_rows], g_area[g_rows], g_crowd[g_rows].astype(bool),
                  d_pair[d_rows], d_bbox[d_rows], d_score[d_rows], rank)
    return pairs, g_rows, d_rows


def ranks(sorted_keys: np.ndarray) -> np.ndarray:
    """Each entry's position among the equal keys before it (keys sorted)."""
    starts = _starts(sorted_keys)
    return np.arange(len(sorted_keys)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_keys)]))


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


@dataclass
class Matches:
    """The matched detections, one entry per (area range, IoU threshold, detection) that found a GT (COCOeval's
    dtMatches > 0), and whether that GT is ignored there (the detection then is too). Every other detection is
    unmatched: a false positive where its box area is inside the area range, ignored where it is outside."""
    area: np.ndarray  # area range index
    thr: np.ndarray  # IoU threshold index
    det: np.ndarray  # detection index (into Pairs' dt arrays)
    gt_ignored: np.ndarray


def match(p: Pairs, params: Params) -> Matches:
    """COCOeval.evaluateImg's greedy matching for every pair, area range and IoU threshold."""
    thrs = np.minimum(np.asarray(params.iouThrs), 1 - 1e-10)
    c = candidates(p, params)
    key = priorities(c)
    gts, g_local = np.unique(c.gt, return_inverse=True)
    taken = np.zeros((len(params.areaRng), len(thrs), len(gts)), bool)
    crowd = p.gt_crowd[c.gt]
    step = np.argsort(p.dt_rank[c.det], kind="stable")  # stays sorted by detection within a rank
    bounds = np.searchsorted(p.dt_rank[c.det][step], np.arange(max(params.maxDets) + 1))
    found = []
    for r in range(max(params.maxDets)):  # one detection of each pair at a time, all pairs at once
        e = step[bounds[r]:bounds[r + 1]]
        if len(e):
            found.append(_match_rank(e, c, key, crowd, g_local, thrs, taken))
    if not found:
        return Matches(*(np.zeros(0, np.int64),) * 3, np.zeros(0, bool))
    return Matches(*(np.concatenate(parts) for parts in zip(*found, strict=True)))


def _match_rank(e, c: Candidates, key, crowd, g_local, thrs, taken) -> tuple:
    """Match the detections of one rank (entries `e`, grouped by detection); marks their GT taken and returns
    (area, threshold, detection, GT ignored) of the matches."""
    dd, gl = c.det[e], g_local[e]
    segs = np.flatnonzero(np.r_[True, dd[1:] != dd[:-1]])
    free = (c.iou[e] >= thrs[:, None])[None] & (crowd[e] | ~taken[:, :, gl])  # [A, T, entries]
    k = np.where(free, key[:, e][:, None, :], -1)
    best = np.maximum.reduceat(k, segs, axis=2)
    seg_of = np.repeat(np.arange(len(segs)), np.diff(np.r_[segs, len(e)]))
    ai, ti, ei = np.nonzero(free & (k == best[:, :, seg_of]))  # one entry per detection: keys differ
    taken[ai, ti, gl[ei]] = True
    return ai, ti, dd[ei], c.ignored[ai, e[ei]]


# ------------------------------------------------------------------------------------------ accumulation
def gt_counts(p: Pairs, params: Params) -> np.ndarray:
    """[K, A]: ground truth that is not ignored, per class and area range (COCOeval's npig)."""
    cat = p.gt_pair % p.n_cats
    ok = ~(p.gt_crowd[None] | outside(p.gt_area, params))
    return np.stack([np.bincount(cat[ok[a]], minlength=p.n_cats) for a in range(len(params.areaRng))], axis=1)


def _starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys begins (keys sorted)."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each of `starts` (sorted, starts[0] == 0)."""
    total = np.cumsum(values)
    before = (total - values)[starts]
    return total - np.repeat(before, np.diff(np.r_[starts, len(values)]))


def class_order(p: Pairs) -> np.ndarray:
    """The detections class by class in pycocotools' accumulation order: score, best first; ties in image order,
    then rank in the pair. They are sorted by (image, category, rank) already, so two stable sorts do it."""
    by_score = np.argsort(-p.dt_score, kind="stable")
    cat = (p.dt_pair % p.n_cats)[by_score]
    return by_score[np.argsort(cat.astype(np.int16) if p.n_cats < 2 ** 15 else cat, kind="stable")]


def accumulate(p: Pairs, m: Matches, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision [T, R, K, A, M] (at max(maxDets); -1 in the other M columns) and recall
    [T, K, A, M].

    pycocotools sorts each class's detections by score (ties: image order, then rank in the pair) and takes
    cumulative true and false positives over them. Only the true positives matter for precision at the recall
    points (precision rises only there), so they are computed there alone: the count of detections not ignored up
    to a true positive is the count of unmatched-looking ones inside the area range (one cumulative sum per area
    range) corrected at the matched ones; the float operations are pycocotools' own."""
    K, A, T, M, R = p.n_cats, len(params.areaRng), len(params.iouThrs), len(params.maxDets), len(params.recThrs)
    npig = gt_counts(p, params)
    valid = npig > 0  # pycocotools: -1 where npig is 0, whether or not the class has detections
    cat = p.dt_pair % K
    order = class_order(p)
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))  # each detection's place in its class's sequence
    class_start = np.searchsorted(cat[order], np.arange(K))
    counted_if_unmatched = ~outside(p.dt_bbox[:, 2] * p.dt_bbox[:, 3], params)[:, order]  # [A, n]
    before = np.cumsum(counted_if_unmatched, axis=1)  # [A, n], over all classes in sequence
    before = np.hstack([np.zeros((A, 1), np.int64), before])  # before[:, i]: counted among the first i

    mk, mpos = cat[m.det], pos[m.det]
    o = np.argsort(((m.area * T + m.thr) * K + mk) * max(len(order), 1) + mpos)  # unique keys: (group, place)
    mk, mpos, det, area, tp = mk[o], mpos[o], m.det[o], m.area[o], ~m.gt_ignored[o]
    group = (area * T + m.thr[o]) * K + mk  # (area range, threshold, class)
    starts = _starts(group)
    # counted (not ignored) detections of the class up to and including each matched one
    delta = tp.astype(np.int64) - counted_if_unmatched[area, mpos]
    counted = before[area, mpos + 1] - before[area, class_start[mk]] + _segment_cumsum(delta, starts)

    recall = np.empty((A, T, K, M))
    for mi, max_det in enumerate(params.maxDets):
        hits = np.bincount(group[tp & (p.dt_rank[det] < max_det)], minlength=A * T * K).reshape(A, T, K)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall[..., mi] = np.where(valid.T[:, None, :], hits / npig.T[:, None, :], -1.0)
    recall = recall.transpose(1, 2, 0, 3)

    precision = -np.ones((T, R, K, A, M))
    precision[:, :, valid, -1] = 0.0
    g_tp, c_tp = group[tp], counted[tp]
    tp_starts = _starts(g_tp)
    n_tp = _segment_cumsum(np.ones(len(g_tp), np.int64), tp_starts).astype(np.float64)  # tp_sum at each
    pr = n_tp / (c_tp.astype(np.float64) + np.spacing(1))  # tp / (fp + tp + eps), fp + tp = counted
    rec_thrs = np.asarray(params.recThrs)
    for s, e in zip(tp_starts.tolist(), tp_starts[1:].tolist() + [len(g_tp)] * bool(len(g_tp)), strict=True):
        a, t, k = np.unravel_index(int(g_tp[s]), (A, T, K))
        best_after = np.maximum.accumulate(pr[s:e][::-1])[::-1]
        inds = np.searchsorted(n_tp[s:e] / npig[k, a], rec_thrs, side="left")
        ok = inds < e - s
        precision[t, ok, k, a, -1] = best_after[inds[ok]]
    return precision, recall


def evaluate(p: Pairs, params: Params | None = None) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluate() + accumulate() for bbox: (precision [T, R, K, A, M], recall [T, K, A, M])."""
    params = params or Params()
    return accumulate(p, match(p, params), params)
