"""COCO bbox metrics (pycocotools, faster-coco-eval or the `fast` array core: same numbers) and the per-class table.

`load_coco` loads the ground truth once for one scorer; `score` takes detections as a list or a results file,
checks them with numpy and turns COCOeval's accumulated arrays into the 12 COCO stats, per-class rows and PR
curves, with null (never NaN) where a class or an area range has no ground truth. With faster-coco-eval the
detections go straight into its C++ evaluator (IoUs computed here, vectorised), skipping `loadRes` and
`_prepare`, whose per-annotation Python loops cost more than the evaluation around them. With `fast` they stay
arrays throughout: `coco_fast` matches and accumulates them with numpy, with pycocotools' rules (pycocotools is
the reference the tests compare all three with).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import time
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mitdet.data.index import check_coco, read_coco
from mitdet.engine import coco_fast
from mitdet.errors import DataError
from mitdet.io import finite_or_none, read_json
from mitdet.params import DEFAULT_SCORER, SCORERS

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; the stdlib parser is the fallback
    orjson = None

log = logging.getLogger(__name__)

# COCOeval.stats in its order: (precision or recall, IoU threshold or None for 0.50:0.95, area range, max dets)
STAT_SPECS = {
    "AP": ("precision", None, "all", 100), "AP50": ("precision", 0.5, "all", 100),
    "AP75": ("precision", 0.75, "all", 100), "APs": ("precision", None, "small", 100),
    "APm": ("precision", None, "medium", 100), "APl": ("precision", None, "large", 100),
    "AR1": ("recall", None, "all", 1), "AR10": ("recall", None, "all", 10), "AR100": ("recall", None, "all", 100),
    "ARs": ("recall", None, "small", 100), "ARm": ("recall", None, "medium", 100),
    "ARl": ("recall", None, "large", 100),
}
STAT_KEYS = tuple(STAT_SPECS)  # all 12, the keys of Scores.summary
SUMMARY_KEYS = STAT_KEYS[:9]  # AP..AR100: the nine older readers index (stats 0-8)
PR_IOUS = (0.5, 0.75)  # the IoU thresholds of the PR curves
AGGREGATE_N = 10  # top10_mAP / bottom10_mAP
RESULT_FIELDS = ("image_id", "category_id", "bbox", "score")
RESULTS_FIX = "a COCO result is {image_id, category_id (integers), bbox [x, y, w, h], score (finite numbers)}"
SPLIT_FIX = "score predictions against the instances_<split>.json of the split they were made on"


@dataclass
class Scores:
    """COCO bbox metrics of one set of detections.

    summary: the 12 COCO stats, STAT_KEYS (float, or None where COCOeval says -1: no GT in that area range).
    per_class: category name -> the 12 stats of that class, `recall` (= its AR100), num_preds, num_gt; the
    stats are None for a class without (non-crowd) ground truth in the scored images or area range.
    aggregates: top10_mAP, bottom10_mAP, ap_spread over classes with GT (None when there is none).
    pr_curves: rows {"iou", "recall", "precision"} averaged over classes with GT (area all, 100 detections).
    timings: seconds per step of this call (read_json, load_results, iou, evaluate..., per_class).
    """
    summary: dict[str, float | None]
    per_class: dict[str, dict[str, Any]]
    aggregates: dict[str, float | None]
    pr_curves: list[dict[str, float]] = field(default_factory=list)
    num_images: int = 0
    num_detections: int = 0
    scorer: str = DEFAULT_SCORER
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Boxes:
    """Annotations or detections as arrays, one row each (detections: in file order)."""
    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray  # [n, 4] x, y, w, h
    score: np.ndarray | None = None  # detections
    area: np.ndarray | None = None  # ground truth: its `area` field (the segment's area in real COCO)
    iscrowd: np.ndarray | None = None
    ann_id: np.ndarray | None = None


@dataclass
class _Prepared:
    """What `score` needs of a ground truth beyond the scorer's COCO object, built once by `load_coco`."""
    image_ids: np.ndarray  # sorted
    cat_ids: np.ndarray  # sorted
    names: dict[int, str]
    anns: _Boxes
    cpp_gt: Any = None  # faster-coco-eval's C++ dataset of the annotations


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic GC: parsing and indexing make millions of acyclic objects, and its passes over them cost
    more than the parse itself (0.4 s becomes 1.0 s on 500k detections)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class ArrayCOCO:
    """The `fast` scorer's ground truth object: `dataset` and (on `mitdet_prepared`) its arrays; no index of
    Python objects per annotation, and no COCOeval (score it with `score`)."""

    def __init__(self):
        self.dataset: dict = {}

    def createIndex(self) -> None:  # noqa: N802 - the name COCO objects have
        """Nothing to index: load_coco puts the arrays on the object."""


def _backend(scorer: str):
    """(COCO, COCOeval) classes of the chosen scorer (`fast`: ArrayCOCO and no COCOeval)."""
    if scorer == "fast":
        return ArrayCOCO, None
    if scorer == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if scorer == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise DataError(f"scorer {scorer!r} is not known", where="evaluate.scorer",
                    fix=f"choose one of: {', '.join(SCORERS)}")


def _scorer_of(coco_gt) -> str:
    if isinstance(coco_gt, ArrayCOCO):
        return "fast"
    return "faster_coco_eval" if type(coco_gt).__module__.startswith("faster_coco_eval") else "pycocotools"


# ------------------------------------------------------------------------------------------ ground truth
def load_ground_truth(gt_json: str | Path | dict) -> dict:
    """The COCO ground truth as a dict (a private copy), checked for what COCOeval reads (a DataError if not)."""
    fix = "run `dvc repro build_index`"
    with _no_gc():
        if isinstance(gt_json, dict):
            gt = check_coco(copy.deepcopy(gt_json), "ground truth dict", strict=True, fix=fix)
        else:
            gt = read_coco(gt_json, strict=True, fix=fix)
        for ann in gt["annotations"]:
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt


def load_coco(gt_json: str | Path | dict, scorer: str = DEFAULT_SCORER):
    """The ground truth as `scorer`'s indexed COCO object: load it once and pass it to `score` many times.

    `score` then scores with that same scorer (the trainer passes evaluate.scorer here and nowhere else).
    """
    COCO, _ = _backend(scorer)
    gt = load_ground_truth(gt_json)
    with _no_gc(), contextlib.redirect_stdout(io.StringIO()):
        prepared = _prepare(gt, scorer)  # first: it names a bad annotation id the library's index would trip on
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        # kept on the library's own object, so callers keep using it as one (loadRes, COCOeval)
        coco_gt.mitdet_prepared = prepared
    return coco_gt


def _prepare(gt: dict, scorer: str) -> _Prepared:
    """The ground truth as arrays (and, for faster-coco-eval, its C++ dataset); a DataError for unusable ids."""
    anns = gt["annotations"]
    where = "ground truth"
    ids = [a.get("id") for a in anns]
    if any(type(i) is not int or i < 1 for i in ids):
        i = next(k for k, v in enumerate(ids) if type(v) is not int or v < 1)
        raise DataError(f"annotations[{i}] has id {ids[i]!r}; COCOeval needs integer ids from 1 (0 means "
                        "'unmatched' to it)", where=where, fix="number the annotations from 1")
    boxes = _Boxes(
        image_id=np.fromiter(map(itemgetter("image_id"), anns), np.int64, len(anns)),
        category_id=np.fromiter(map(itemgetter("category_id"), anns), np.int64, len(anns)),
        bbox=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        area=np.array([a["area"] if "area" in a else a["bbox"][2] * a["bbox"][3] for a in anns], dtype=np.float64),
        iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        ann_id=np.array(ids, dtype=np.int64))
    prepared = _Prepared(image_ids=np.unique(np.array([im["id"] for im in gt["images"]], dtype=np.int64)),
                         cat_ids=np.unique(np.array([c["id"] for c in gt["categories"]], dtype=np.int64)),
                         names={int(c["id"]): c["name"] for c in gt["categories"]}, anns=boxes)
    if scorer == "faster_coco_eval":
        prepared.cpp_gt = _cpp_ground_truth(boxes)
    return prepared


def _cpp_ground_truth(g: _Boxes):
    """faster-coco-eval's C++ dataset of the annotations, grouped by (image, category) in file order."""
    import faster_coco_eval.faster_eval_api_cpp as _C

    crowd = g.iscrowd.astype(int).tolist()
    # `ignore` is iscrowd, as COCOeval._prepare sets it (a dataset's own `ignore` field is overridden there too)
    rows = [{"id": i, "area": a, "iscrowd": c, "ignore": c}
            for i, a, c in zip(g.ann_id.tolist(), g.area.tolist(), crowd, strict=True)]
    ds = _C.Dataset()
    order = np.lexsort((g.category_id, g.image_id))
    ds.load_tuple(_grouped(rows, order, g.image_id[order], g.category_id[order]))
    return ds


def _grouped(rows: list, order: np.ndarray | None, image_id: np.ndarray, category_id: np.ndarray) -> tuple:
    """load_tuple's argument: (number of groups, [(image id, category id, [rows of that pair])...]); `rows`
    taken in `order` (None: as they are), `image_id`/`category_id` of the rows in that order."""
    n = len(image_id)
    if n == 0:
        return 0, []
    cut = np.flatnonzero((np.diff(image_id) != 0) | (np.diff(category_id) != 0)) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, n]
    ordered = rows if order is None else [rows[i] for i in order.tolist()]
    keys = zip(image_id[starts].tolist(), category_id[starts].tolist(), starts.tolist(), ends.tolist(), strict=True)
    groups = [(float(im), float(c), ordered[s:e]) for im, c, s, e in keys]
    return len(groups), groups


def _ground_truth(gt_json, scorer: str | None):
    """(the scorer's COCO object, its _Prepared, the scorer) for a path, a dict or a loaded COCO object."""
    if not hasattr(gt_json, "createIndex"):
        gt_json = load_coco(gt_json, scorer or DEFAULT_SCORER)
    own = _scorer_of(gt_json)
    if scorer is not None and scorer != own:
        raise DataError(f"the ground truth was loaded for {own}, not {scorer}", where="score(scorer=...)",
                        fix="pass the same scorer (evaluate.scorer) to load_coco and score, or none to score")
    prepared = getattr(gt_json, "mitdet_prepared", None)
    if prepared is None:  # a COCO object loaded elsewhere
        with _no_gc():
            prepared = gt_json.mitdet_prepared = _prepare(gt_json.dataset, own)
    return gt_json, prepared, own


# ------------------------------------------------------------------------------------------ detections
def read_results(path: str | Path) -> list:
    """A COCO results file as a list (orjson, GC paused); malformed JSON is a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such results file", where=str(path), fix="write the predictions first")
    with _no_gc():
        if orjson is None:
            data = read_json(path)
        else:
            try:
                data = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err})", where=str(path)) from None
    if not isinstance(data, list):
        raise DataError(f"is a JSON {type(data).__name__}, not a list of COCO results", where=str(path),
                        fix=RESULTS_FIX)
    return data


def _column(results: list, key: str, types: tuple, dtype) -> np.ndarray:
    values = list(map(itemgetter(key), results))
    if not set(map(type, values)) <= set(types):
        raise TypeError(key)
    return np.fromiter(values, dtype, len(values))


def detection_arrays(results: list, where: str) -> _Boxes:
    """Arrays of the detections, checked in bulk; the first bad entry is named when a check fails (what `score`
    does with a list; a caller that checks more on the arrays passes them to `score` as they are)."""
    try:
        boxes = list(map(itemgetter("bbox"), results))
        if not set(map(type, boxes)) <= {list} or not set(map(len, boxes)) <= {4}:
            raise TypeError("bbox")
        det = _Boxes(image_id=_column(results, "image_id", (int,), np.int64),
                     category_id=_column(results, "category_id", (int,), np.int64),
                     score=_column(results, "score", (int, float), np.float64),
                     bbox=_flat_boxes(boxes))
    except (KeyError, TypeError, OverflowError):
        raise _first_bad_result(results, where) from None
    if not (np.isfinite(det.score).all() and np.isfinite(det.bbox).all()):
        raise _first_bad_result(results, where)
    return det


def _flat_boxes(boxes: list) -> np.ndarray:
    flat = list(chain.from_iterable(boxes))
    if not set(map(type, flat)) <= {int, float}:
        raise TypeError("bbox")
    return np.fromiter(flat, np.float64, len(flat)).reshape(-1, 4)


def _result_problem(r) -> str | None:
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not an object"
    missing = [k for k in RESULT_FIELDS if k not in r]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if type(r["image_id"]) is not int or type(r["category_id"]) is not int:
        return f"image_id and category_id must be integers; got {r['image_id']!r}, {r['category_id']!r}"
    box = r["bbox"]
    if type(box) is not list or len(box) != 4 or any(type(v) not in (int, float) or not np.isfinite(v) for v in box):
        return f"bbox must be [x, y, w, h] (4 finite numbers); got {str(box)[:80]}"
    if type(r["score"]) not in (int, float) or not np.isfinite(r["score"]):
        return f"score must be a finite number; got {r['score']!r}"
    return None


def _first_bad_result(results: list, where: str) -> DataError:
    for i, r in enumerate(results):
        problem = _result_problem(r)
        if problem:
            return DataError(f"entry [{i}]: {problem}", where=where, fix=RESULTS_FIX)
    return DataError("an entry cannot be scored", where=where, fix=RESULTS_FIX)  # pragma: no cover


def _member(values: np.ndarray, sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is each value in sorted_ids, its index there where it is)."""
    pos = np.searchsorted(sorted_ids, values)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    hit = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == values) if len(sorted_ids) else np.zeros(len(values), bool)
    return hit, pos_c


def _image_subset(prep: _Prepared, image_ids: Iterable[int] | None) -> np.ndarray:
    if image_ids is None:
        return prep.image_ids
    ids = np.unique(np.fromiter((int(i) for i in image_ids), np.int64))
    hit, _ = _member(ids, prep.image_ids)
    if not hit.all():
        raise DataError(f"{int((~hit).sum())} id(s) not in the ground truth (e.g. {ids[~hit][:5].tolist()})",
                        where="image_ids", fix=SPLIT_FIX)
    return ids


def _scored(det: _Boxes, prep: _Prepared, ids: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(detections on the scored images, of those the ones whose matching can change a number: classes with
    non-crowd GT in those images)."""
    known, _ = _member(det.image_id, prep.image_ids)
    if not known.all():
        unknown = np.unique(det.image_id[~known])
        raise DataError(f"{len(unknown)} image_id(s) not in the ground truth (e.g. {unknown[:5].tolist()})",
                        where=where, fix=SPLIT_FIX)
    on_images, _ = _member(det.image_id, ids)
    in_cats, _ = _member(det.category_id, prep.cat_ids)
    stray = on_images & ~in_cats
    if stray.any():
        log.warning("%d detection(s) have category ids absent from the ground truth (%s); COCOeval ignores them",
                    int(stray.sum()), np.unique(det.category_id[stray])[:10].tolist())
    if not on_images.any():
        log.warning("no detections to score on %d image(s): AP is 0 for every class with ground truth", len(ids))
    # a class without non-crowd GT here has precision and recall -1 whatever its detections: skip matching them
    g = prep.anns
    with_gt = np.unique(g.category_id[_member(g.image_id, ids)[0] & ~g.iscrowd])
    return on_images, on_images & _member(det.category_id, with_gt)[0]


# ------------------------------------------------------------------------------------------ scoring
def score(gt_json, results: list[dict] | str | Path | _Boxes, scorer: str | None = None,
          image_ids: Iterable[int] | None = None) -> Scores:
    """COCO bbox metrics of `results` (a COCO results list, the path of a results file, or the arrays
    `detection_arrays` made of a list) against `gt_json`.

    `gt_json`: a path, a dict (copied), or the COCO object `load_coco(..., scorer)` returned (used as is, so a
    loop that scores often loads it once). `scorer`: None takes the loaded object's scorer, or DEFAULT_SCORER;
    one that differs from the loaded object's is a DataError. `image_ids` restricts scoring to those images
    (results on other images are dropped). Empty results give AP 0 for every class with GT and a warning.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    with _no_gc():
        coco_gt, prep, scorer = _ground_truth(gt_json, scorer)
        t = _timed(timings, "load_ground_truth", t)
        where = "results"
        if isinstance(results, (str, Path)):
            where, results = str(results), read_results(results)
        t = _timed(timings, "read_json", t)
        det = results if isinstance(results, _Boxes) else detection_arrays(results, where)
        results = None  # a list read here is freed now, while the GC is paused (else its next pass walks it all)
        ids = _image_subset(prep, image_ids)
        on_images, evaluated = _scored(det, prep, ids, where)
        _timed(timings, "load_results", t)
        run = {"fast": _eval_fast, "faster_coco_eval": _eval_faster, "pycocotools": _eval_pycocotools}[scorer]
        precision, recall, params = run(coco_gt, prep, det, np.flatnonzero(evaluated), ids, timings)
        t = time.perf_counter()
        scores = _scores_from_arrays(precision, recall, params, prep, det, on_images, ids)
    scores.scorer = scorer
    _timed(timings, "per_class", t)
    scores.timings = timings
    return scores


def _timed(timings: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _eval_pycocotools(coco_gt, prep: _Prepared, det: _Boxes, rows: np.ndarray, ids: np.ndarray, timings: dict):
    """pycocotools' own path: a results COCO object (as loadRes builds it), evaluate, accumulate."""
    COCO, COCOeval = _backend("pycocotools")
    t = time.perf_counter()
    boxes = det.bbox[rows].tolist()
    columns = zip(rows.tolist(), det.image_id[rows].tolist(), det.category_id[rows].tolist(), boxes,
                  det.score[rows].tolist(), strict=True)
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0}
            for i, im, c, b, s in columns]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = COCO()
        coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                           "annotations": anns}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids.tolist()
        t = _timed(timings, "load_results", t)
        ev.evaluate()
        t = _timed(timings, "evaluate", t)
        ev.accumulate()
        _timed(timings, "accumulate", t)
    return np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"]), ev.params


def _eval_faster(coco_gt, prep: _Prepared, det: _Boxes, rows: np.ndarray, ids: np.ndarray, timings: dict):
    """faster-coco-eval's C++ evaluate + accumulate, fed directly: IoUs from here, detections grouped by pair."""
    import faster_coco_eval.faster_eval_api_cpp as _C
    from faster_coco_eval.core.cocoeval import Params

    t = time.perf_counter()
    p = Params(iouType="bbox")
    p.imgIds, p.catIds = ids.tolist(), prep.cat_ids.tolist()
    pairs = _DetectionPairs(prep, det, rows, ids, max_dets=p.maxDets[-1])
    cpp_dt = pairs.cpp_dataset(det)
    t = _timed(timings, "load_results", t)
    ious = pairs.cpp_ious(prep, det)
    t = _timed(timings, "iou", t)
    out = _C.COCOevalEvaluateAccumulate(p, ious, prep.cpp_gt, cpp_dt, p.imgIds, p.catIds, True)
    _timed(timings, "evaluate_accumulate", t)
    return np.asarray(out["precision"]), np.asarray(out["recall"]), p


def _eval_fast(coco_gt, prep: _Prepared, det: _Boxes, rows: np.ndarray, ids: np.ndarray, timings: dict):
    """The array core: the evaluated detections and the scored images' ground truth as coco_fast.Pairs, matched
    and accumulated with numpy."""
    params = coco_fast.Params()
    t = time.perf_counter()
    gt, dt = fast_inputs(prep, det, rows, ids)
    pairs, _, _ = coco_fast.group_pairs(len(prep.cat_ids), gt, dt, max(params.maxDets))
    t = _timed(timings, "load_results", t)
    matches = coco_fast.match(pairs, params)
    t = _timed(timings, "evaluate", t)
    precision, recall = coco_fast.accumulate(pairs, matches, params)
    _timed(timings, "accumulate", t)
    return precision, recall, params


def fast_inputs(prep: _Prepared, det: _Boxes, rows: np.ndarray, ids: np.ndarray) -> tuple[tuple, tuple]:
    """coco_fast.group_pairs' (ground truth, detections) arrays: the scored images' ground truth of the evaluated
    categories and the detections `rows`, images and categories as positions in `ids` and `prep.cat_ids`."""
    g = prep.anns
    g_rows = np.flatnonzero(_member(g.image_id, ids)[0] & _member(g.category_id, prep.cat_ids)[0])
    gt = (np.searchsorted(ids, g.image_id[g_rows]), np.searchsorted(prep.cat_ids, g.category_id[g_rows]),
          g.bbox[g_rows], g.area[g_rows], g.iscrowd[g_rows])
    dt = (np.searchsorted(ids, det.image_id[rows]), np.searchsorted(prep.cat_ids, det.category_id[rows]),
          det.bbox[rows], det.score[rows])
    return gt, dt


class _DetectionPairs:
    """The evaluated detections by (image, category) pair, best score first, at most max_dets a pair (COCOeval's
    order: ties keep file order), and the ground truth of the same pairs in file order."""

    def __init__(self, prep: _Prepared, det: _Boxes, rows: np.ndarray, ids: np.ndarray, max_dets: int):
        self.ids, self.cat_ids = ids, prep.cat_ids
        pair = self._keys(det.image_id[rows], det.category_id[rows])
        order = np.lexsort((rows, -det.score[rows], pair))
        pair = pair[order]
        starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, np.int64)
        rank = np.arange(len(pair)) - np.repeat(starts, np.diff(np.r_[starts, len(pair)]))
        top = rank < max_dets  # COCOeval drops the rest of a pair's detections before matching
        self.rows, self.pair = rows[order][top], pair[top]
        g = prep.anns
        g_rows = np.flatnonzero(_member(g.image_id, ids)[0] & _member(g.category_id, prep.cat_ids)[0])
        g_pair = self._keys(g.image_id[g_rows], g.category_id[g_rows])
        g_order = np.argsort(g_pair, kind="stable")
        self.g_rows, self.g_pair = g_rows[g_order], g_pair[g_order]

    def _keys(self, image_id: np.ndarray, category_id: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, image_id) * len(self.cat_ids) + np.searchsorted(self.cat_ids, category_id)

    def cpp_dataset(self, det: _Boxes):
        """The C++ dataset of the detections: id (file position + 1, as loadRes numbers them), score, box area."""
        import faster_coco_eval.faster_eval_api_cpp as _C

        r = self.rows
        area = (det.bbox[r, 2] * det.bbox[r, 3]).tolist()
        dicts = [{"id": i + 1, "score": s, "area": a}
                 for i, s, a in zip(r.tolist(), det.score[r].tolist(), area, strict=True)]
        k = len(self.cat_ids)
        ds = _C.Dataset()
        # already best first within a pair: the evaluator's stable sort by score keeps this order
        ds.load_tuple(_grouped(dicts, None, self.ids[self.pair // k], self.cat_ids[self.pair % k]))
        return ds

    def cpp_ious(self, prep: _Prepared, det: _Boxes) -> list:
        """IoUs as the evaluator takes them: [image][category] -> rows of detections (best first) x GT (file
        order), [] where a pair lacks either."""
        lo = np.searchsorted(self.g_pair, self.pair, "left")
        n_gt = np.searchsorted(self.g_pair, self.pair, "right") - lo
        d_idx = np.repeat(np.arange(len(self.pair)), n_gt)
        offset = np.arange(len(d_idx)) - np.repeat(np.cumsum(n_gt) - n_gt, n_gt)
        g_ann = self.g_rows[np.repeat(lo, n_gt) + offset]
        iou = _bbox_iou(det.bbox[self.rows[d_idx]], prep.anns.bbox[g_ann], prep.anns.iscrowd[g_ann])
        k = len(self.cat_ids)
        empty: list = []
        nested = [[empty] * k for _ in range(len(self.ids))]
        with_gt = np.flatnonzero(n_gt)  # whole pairs: every detection of a pair sees the same GT
        pairs = self.pair[with_gt]
        block = np.flatnonzero(np.r_[True, pairs[1:] != pairs[:-1]]) if len(with_gt) else with_gt
        first = with_gt[block]
        entry = np.cumsum(n_gt) - n_gt  # where each detection's IoUs start in `iou`
        sizes = np.diff(np.r_[block, len(with_gt)]).tolist()  # detections per pair
        for p, d0, nd in zip(self.pair[first].tolist(), first.tolist(), sizes, strict=True):
            ng = int(n_gt[d0])
            nested[p // k][p % k] = iou[entry[d0]:entry[d0] + nd * ng].reshape(nd, ng).tolist()
        return nested


_bbox_iou = coco_fast.bbox_iou  # pycocotools' bbIou, vectorised


# ------------------------------------------------------------------------------------------ from arrays
def _stat(precision: np.ndarray, recall: np.ndarray, params, key: str) -> tuple[float | None, np.ndarray]:
    """One COCO stat (STAT_SPECS[key]): over all classes, and per class (NaN for none). Both are means of the
    entries > -1 (COCOeval's 'no ground truth' marker); the overall one is None when there is none."""
    kind, iou, area, max_dets = STAT_SPECS[key]
    a, m = list(params.areaRngLbl).index(area), list(params.maxDets).index(max_dets)
    s = precision[:, :, :, a, m] if kind == "precision" else recall[:, :, a, m]  # [T, R, K] or [T, K]
    if iou is not None:
        s = s[int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou)))]
    valid = s > -1
    overall = finite_or_none(np.mean(s[valid])) if valid.any() else None
    per_class = np.full(s.shape[-1], np.nan)
    for k in np.flatnonzero(valid.reshape(-1, s.shape[-1]).any(axis=0)):  # np.mean of each: summarize's sums
        per_class[k] = np.mean(s[..., k][valid[..., k]])
    return overall, per_class


def _counts(values: np.ndarray, cat_ids: np.ndarray) -> np.ndarray:
    hit, pos = _member(values, cat_ids)
    return np.bincount(pos[hit], minlength=len(cat_ids))


def _scores_from_arrays(precision, recall, params, prep: _Prepared, det: _Boxes, on_images: np.ndarray,
                        ids: np.ndarray) -> Scores:
    stats = {key: _stat(precision, recall, params, key) for key in STAT_KEYS}
    g = prep.anns
    counted = _member(g.image_id, ids)[0] & ~g.iscrowd  # the objects COCOeval counts (crowd regions are not)
    num_gt = _counts(g.category_id[counted], prep.cat_ids)
    num_preds = _counts(det.category_id[on_images], prep.cat_ids)
    per_class: dict[str, dict[str, Any]] = {}
    for k, cat_id in enumerate(prep.cat_ids.tolist()):
        row: dict[str, Any] = {key: finite_or_none(per[k]) for key, (_, per) in stats.items()}
        row.update(recall=row["AR100"], num_preds=int(num_preds[k]), num_gt=int(num_gt[k]))
        name = prep.names.get(cat_id, str(cat_id))
        if name in per_class:  # two categories sharing a name: keep both, the id tells them apart
            name = f"{name} (id {cat_id})"
        per_class[name] = row
    with_gt = [k for k, r in enumerate(per_class.values()) if r["AP"] is not None]
    return Scores(summary={key: overall for key, (overall, _) in stats.items()}, per_class=per_class,
                  aggregates=_aggregates(per_class), pr_curves=_pr_curves(precision, params, with_gt),
                  num_images=len(ids), num_detections=int(on_images.sum()))


def _aggregates(per_class: dict) -> dict[str, float | None]:
    aps = sorted((r["AP"] for r in per_class.values() if r["AP"] is not None), reverse=True)
    return {"top10_mAP": float(np.mean(aps[:AGGREGATE_N])) if aps else None,
            "bottom10_mAP": float(np.mean(aps[-AGGREGATE_N:])) if aps else None,
            "ap_spread": float(aps[0] - aps[-1]) if aps else None}


def _pr_curves(precision: np.ndarray, params, with_gt: list[int]) -> list[dict[str, float]]:
    """Precision at COCOeval's 101 recall points, averaged over the classes with GT (area all, 100 dets)."""
    if not with_gt:
        return []
    iou = np.asarray(params.iouThrs)
    a_all, m100 = list(params.areaRngLbl).index("all"), list(params.maxDets).index(max(params.maxDets))
    rows = []
    for thr in PR_IOUS:
        t = int(np.argmin(np.abs(iou - thr)))
        curve = precision[t, :, with_gt, a_all, m100]  # [classes with GT, R] (fancy index moves K first)
        curve = np.where(curve > -1, curve, 0.0).mean(axis=0)
        rows += [{"iou": thr, "recall": round(float(r), 2), "precision": float(v)}
                 for r, v in zip(params.recThrs, curve, strict=True)]
    return rows


# ------------------------------------------------------------------------------------------ the table
NO_AP_YET = "no AP yet"


def _fmt(v, width: int = 6) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.3f}"


def _table_line(name: str, r: dict, width: int) -> str:
    ratio = f"{r['num_preds'] / r['num_gt']:8.2f}" if r["num_gt"] else f"{'-':>8}"
    return (f"{name:<{width}}  {_fmt(r['AP'])}  {_fmt(r['AP50'])}  {_fmt(r['APs'])}  {_fmt(r['APm'])}  "
            f"{_fmt(r['APl'])}  {r['num_preds']:6d}  {r['num_gt']:6d}  {_fmt(r['recall'])}  {ratio}")


def _names(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def per_class_table(scores: Scores, top_k: int = 10) -> str:
    """The per-class table: top and bottom `top_k` classes with AP above 0, the classes with no AP yet (AP 0: no
    ranking among them, so none is listed as 'top' by its name), then the 12 stats and the aggregates."""
    with_gt = [(n, r) for n, r in scores.per_class.items() if r["AP"] is not None]
    ranked = sorted(((n, r) for n, r in with_gt if r["AP"] > 0), key=lambda nr: (-nr[1]["AP"], nr[0]))
    zero = sorted(n for n, r in with_gt if r["AP"] == 0)
    no_gt = [n for n, r in scores.per_class.items() if r["AP"] is None]
    width = max([len(n) for n, _ in with_gt] + [12])
    head = (f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'APs':>6}  {'APm':>6}  {'APl':>6}  {'preds':>6}  "
            f"{'GT':>6}  {'recall':>6}  {'preds/GT':>8}")
    k = min(top_k, len(ranked))
    bottom = ranked[max(k, len(ranked) - top_k):][::-1]  # worst first, none repeated from the top table
    out = [f"TOP PERFORMING CLASSES (top {k} by AP)", head, "-" * len(head)]
    out += [_table_line(n, r, width) for n, r in ranked[:k]] or [f"({NO_AP_YET}: no class has AP above 0)"]
    out += ["", f"CLASSES NEEDING ATTENTION (bottom {len(bottom)} by AP)", head, "-" * len(head)]
    out += [_table_line(n, r, width) for n, r in bottom] or [
        "(every class with AP above 0 is listed above)" if ranked else f"({NO_AP_YET})"]
    if zero:
        out.append(f"{NO_AP_YET} (AP 0, {len(zero)} of {len(with_gt)} classes with GT): {_names(zero)}")
    out += [""] + _summary_lines(scores, len(with_gt))
    if no_gt:
        out.append(f"no GT in these images (AP null): {_names(no_gt)}")
    return "\n".join(out)


def _summary_lines(scores: Scores, n_with_gt: int) -> list[str]:
    s, a = scores.summary, scores.aggregates

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    return ["recall = AR@100 averaged over IoU 0.50:0.95; APs/APm/APl: AP of small/medium/large objects (- where "
            "the class has none); preds/GT = detections submitted per GT object (not a recall)",
            f"mAP (AP@[.50:.95]) {fmt(s['AP'])}   AP50 {fmt(s['AP50'])}   AP75 {fmt(s['AP75'])}   "
            f"APs {fmt(s['APs'])}   APm {fmt(s['APm'])}   APl {fmt(s['APl'])}",
            f"AR1 {fmt(s['AR1'])}   AR10 {fmt(s['AR10'])}   AR100 {fmt(s['AR100'])}   "
            f"ARs {fmt(s['ARs'])}   ARm {fmt(s['ARm'])}   ARl {fmt(s['ARl'])}",
            f"top{AGGREGATE_N}_mAP {fmt(a['top10_mAP'])}   bottom{AGGREGATE_N}_mAP {fmt(a['bottom10_mAP'])}   "
            f"ap_spread {fmt(a['ap_spread'])}",
            f"classes with GT {n_with_gt}/{len(scores.per_class)}   images {scores.num_images}   "
            f"detections {scores.num_detections}   scorer {scores.scorer}"]
