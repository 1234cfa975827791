"""The `fast` scorer's array core against pycocotools' COCOeval run directly: the precision and recall arrays (every
cell, -1 markers included) and, through `score`, the 12 stats and every class's stats, on adversarial inputs."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from mitdet.engine import coco_fast
from mitdet.engine.scoring import load_coco, score
from tests.test_scoring import assert_equals_pycocotools

CATS = (1, 3, 4, 8, 11, 17)  # 11: detections only (no GT); 17: crowd regions only
EDGES = (32.0 ** 2, 96.0 ** 2)  # COCO's small/medium/large boundaries


class Adversarial:
    """GT with duplicate boxes and equal-IoU neighbours (ties), crowd regions over objects, areas on the range
    boundaries, a class of crowd regions only, empty images; detections with scores tied in groups, boxes whose
    area is on a boundary, one pair with 150 detections, images without any, a class without GT."""

    def __init__(self, seed: int, n_images: int):
        self.rng = np.random.default_rng(seed)
        self.images, self.anns, self.dets, self.tie_breaks = [], [], [], []
        for i in range(1, n_images + 1):
            self.images.append({"id": 100 + 3 * i, "file_name": f"{i}.jpg", "width": 400, "height": 300})
            if i % 9:  # every 9th image has no GT
                self.image_gt(100 + 3 * i, i)
        self.found_objects()
        self.background()
        self.tied_and_beyond_max_dets()

    def ann(self, image_id, cat, box, crowd=0, area=None):
        self.anns.append({"id": len(self.anns) + 1, "image_id": image_id, "category_id": cat,
                          "bbox": [float(v) for v in box], "area": float(box[2] * box[3] if area is None else area),
                          "iscrowd": crowd})

    def det(self, image_id, cat, box, s):
        self.dets.append({"image_id": image_id, "category_id": int(cat), "bbox": [float(v) for v in box],
                          "score": round(float(s), 1)})  # one digit: many ties

    def image_gt(self, image_id: int, i: int) -> None:
        rng = self.rng
        for _ in range(int(rng.integers(1, 7))):
            side = float(rng.choice([20.0, 32.0, 50.0, 96.0, 140.0])) * float(rng.choice([1.0, rng.uniform(0.8, 1.2)]))
            box = [rng.uniform(0, 250), rng.uniform(0, 150), side, side * rng.uniform(0.7, 1.3)]
            cat = int(rng.choice(CATS[:4]))
            area = float(rng.choice(EDGES)) if rng.random() < 0.15 else box[2] * box[3] * rng.uniform(0.4, 1.0)
            self.ann(image_id, cat, box, area=area)
            if rng.random() < 0.2:
                self.ann(image_id, cat, box, area=area)  # the same box twice: IoU ties
            if rng.random() < 0.1:
                self.ann(image_id, cat, [box[0] - 10, box[1] - 10, box[2] + 30, box[3] + 30], crowd=1)
        if i % 7 == 0:
            self.ann(image_id, 17, [50, 50, 200, 150], crowd=1)
        if i % 4 == 1:  # two GT at the same IoU from one detection: pycocotools takes the later; the next
            # detection then finds the later one taken (a miss) where taking the earlier would have left it free
            self.ann(image_id, 4, [290, 240, 50, 50])
            self.ann(image_id, 4, [310, 240, 50, 50])
            self.tie_breaks.append(image_id)

    def found_objects(self) -> None:
        rng = self.rng
        for a in self.anns:
            if a["image_id"] % 5 == 0:
                continue  # images whose objects nobody found
            x, y, w, h = a["bbox"]
            for j in range(int(rng.integers(0, 4))):
                s = 0.04 * (1 + j) * max(w, h)
                box = [x + rng.normal(0, s), y + rng.normal(0, s), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
                self.det(a["image_id"], a["category_id"] if rng.random() > 0.1 else rng.choice(CATS), box, rng.random())

    def background(self) -> None:
        rng = self.rng
        for im in self.images:
            for _ in range(int(rng.integers(0, 6))):
                side = float(rng.choice([32.0, 96.0, rng.uniform(5, 150)]))  # box areas on the boundaries too
                box = [rng.uniform(0, 250), rng.uniform(0, 150), side, side]
                self.det(im["id"], rng.choice(CATS), box, rng.random())

    def tied_and_beyond_max_dets(self) -> None:
        for image_id in self.tie_breaks:
            self.det(image_id, 4, [300, 240, 50, 50], 0.9)
            self.det(image_id, 4, [315, 240, 50, 50], 0.8)
        a = next(a for a in self.anns if not a["iscrowd"] and a["image_id"] % 5)
        x, y, w, h = a["bbox"]
        for i in range(150):  # beyond maxDets 100 in one pair, with tied scores
            self.det(a["image_id"], a["category_id"], [x + i % 7, y + i % 4, w, h], 0.2 + (i % 6) / 10)


def adversarial(seed: int, n_images: int = 40) -> tuple[dict, list[dict]]:
    """(ground truth, detections in no particular order) of Adversarial."""
    case = Adversarial(seed, n_images)
    order = case.rng.permutation(len(case.dets))
    gt = {"images": case.images, "annotations": case.anns, "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}
    return gt, [case.dets[i] for i in order]


def pycocotools_eval(gt: dict, dets: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, coco


def core_arrays(gt: dict, dets: list[dict]):
    """coco_fast.evaluate on every detection of a GT category (what COCOeval evaluates)."""
    img = np.array(sorted(im["id"] for im in gt["images"]))
    cats = np.array(sorted(c["id"] for c in gt["categories"]))
    anns = gt["annotations"]
    g = (np.searchsorted(img, [a["image_id"] for a in anns]), np.searchsorted(cats, [a["category_id"] for a in anns]),
         np.array([a["bbox"] for a in anns]), np.array([a["area"] for a in anns]),
         np.array([a["iscrowd"] for a in anns], bool))
    dets = [d for d in dets if d["category_id"] in set(cats.tolist())]
    d = (np.searchsorted(img, [x["image_id"] for x in dets]), np.searchsorted(cats, [x["category_id"] for x in dets]),
         np.array([x["bbox"] for x in dets]).reshape(-1, 4), np.array([x["score"] for x in dets], float))
    pairs, _, _ = coco_fast.group_pairs(len(cats), g, d, 100)
    return coco_fast.evaluate(pairs)


@pytest.mark.parametrize("seed", range(6))
def test_precision_and_recall_arrays_equal_pycocotools(seed):
    gt, dets = adversarial(seed)
    ev, _ = pycocotools_eval(gt, dets)
    precision, recall = core_arrays(gt, dets)
    ref_p, ref_r = ev.eval["precision"], ev.eval["recall"]
    assert np.array_equal(recall, ref_r)  # bit-identical, the -1 cells too
    assert np.array_equal(precision[..., -1], ref_p[..., -1])
    assert (precision[..., :-1] == -1).all()  # computed at maxDets 100 only (no COCO stat reads the others)
    k = list(ev.params.catIds)
    assert (ref_r[:, k.index(11)] == -1).all() and (ref_r[:, k.index(17)] == -1).all()  # no GT / crowd only
    assert ((ref_p[..., -1] > 0) & (ref_p[..., -1] < 1)).any()


@pytest.mark.parametrize("seed", range(3))
def test_fast_scorer_gives_pycocotools_stats_and_per_class_values(seed):
    gt, dets = adversarial(seed + 10, n_images=60)
    ev, coco = pycocotools_eval(gt, dets)
    ours = score(load_coco(gt, "fast"), dets)
    assert ours.scorer == "fast"
    assert ours.per_class["c11"]["AP"] is None and ours.per_class["c11"]["num_preds"] > 0
    assert ours.per_class["c17"]["AP"] is None and ours.per_class["c17"]["num_gt"] == 0
    assert_equals_pycocotools(ours, ev, coco, tol=0.0)  # bit-identical
    ref = score(gt, dets, scorer="pycocotools")
    assert ours.summary == ref.summary and ours.per_class == ref.per_class  # bit-identical
    assert ours.pr_curves == ref.pr_curves


def test_empty_inputs():
    gt, dets = adversarial(1, n_images=10)
    ev, _ = pycocotools_eval(gt, dets[:1])
    precision, recall = core_arrays(gt, dets[:1])
    assert np.array_equal(recall, ev.eval["recall"])
    assert np.array_equal(precision[..., -1], ev.eval["precision"][..., -1])
    s = score(load_coco(gt, "fast"), [])
    assert s.summary["AP"] == 0.0 and s.per_class["c1"]["AP"] == 0.0 and s.per_class["c11"]["AP"] is None
    no_gt = dict(gt, annotations=[])
    assert score(load_coco(no_gt, "fast"), dets).summary["AP"] is None
