"""COCO scoring: known per-class AP on hand-made ground truth, both scorers agreeing, strict JSON."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from mitdet.engine.scoring import SUMMARY_KEYS, load_coco, per_class_table, score
from mitdet.io import read_json, write_json

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TINY50_VAL = FIXTURES / "coco2017-tiny50" / "annotations" / "instances_val2017.json"
SCORERS = ["pycocotools", "faster_coco_eval"]


def make_gt() -> dict:
    """3 images; cat (id 3) and dog (id 7) with medium boxes, bird (id 11) without GT, one crowd dog region."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 300, "height": 200} for i in (10, 20, 30)]
    anns = []

    def add(image_id, cat, box, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                     "area": box[2] * box[3], "iscrowd": crowd})

    add(10, 3, [10, 10, 50, 50])
    add(10, 7, [100, 20, 60, 80])
    add(20, 3, [30, 40, 70, 50])
    add(20, 7, [150, 50, 80, 60])
    add(30, 7, [20, 20, 90, 90])
    add(30, 7, [180, 100, 100, 90], crowd=1)
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    return {"images": images, "annotations": anns, "categories": cats}


def as_detections(gt: dict, score_=1.0) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score_}
            for a in gt["annotations"] if not a["iscrowd"]]


@pytest.mark.parametrize("scorer", SCORERS)
def test_perfect_detector_scores_one(scorer):
    gt = make_gt()
    s = score(gt, as_detections(gt), scorer=scorer)
    for key in ("AP", "AP50", "AP75", "APm", "AR100"):
        assert s.summary[key] == pytest.approx(1.0)
    assert s.per_class["cat"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0),
                                  "recall": pytest.approx(1.0), "num_preds": 2, "num_gt": 2}
    assert s.per_class["dog"]["num_gt"] == 3  # the crowd region is not an object to find
    assert s.per_class["dog"]["AP"] == pytest.approx(1.0)
    assert s.aggregates["ap_spread"] == pytest.approx(0.0)


@pytest.mark.parametrize("scorer", SCORERS)
def test_only_wrong_classes_score_zero(scorer):
    gt = make_gt()
    swapped = [dict(d, category_id=3 if d["category_id"] == 7 else 7) for d in as_detections(gt)]
    s = score(gt, swapped, scorer=scorer)
    assert s.summary["AP"] == 0.0 and s.summary["AP50"] == 0.0
    for name in ("cat", "dog"):
        assert s.per_class[name]["AP"] == 0.0 and s.per_class[name]["recall"] == 0.0


@pytest.mark.parametrize("scorer", SCORERS)
def test_half_right_cases_give_their_exact_value(scorer):
    gt = make_gt()
    dets = [
        # cat: one exact hit (0.9) and one miss (0.8, on empty ground): precision 1 up to recall 0.5, then no more
        # recall -> 51 of COCO's 101 recall points at precision 1 -> AP 51/101 at every IoU threshold
        {"image_id": 10, "category_id": 3, "bbox": [10, 10, 50, 50], "score": 0.9},
        {"image_id": 30, "category_id": 3, "bbox": [200, 10, 40, 40], "score": 0.8},
        # dog: every object found, but with IoU 0.62 (a 90x55.8 box inside a 90x90 one etc.): a hit at the
        # thresholds 0.50, 0.55, 0.60 only -> AP = 3/10, AP50 = 1, AP75 = 0
    ]
    for a in gt["annotations"]:
        if a["category_id"] == 7 and not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            dets.append({"image_id": a["image_id"], "category_id": 7, "bbox": [x, y, w, h * 0.62], "score": 0.7})
    s = score(gt, dets, scorer=scorer)
    cat, dog = s.per_class["cat"], s.per_class["dog"]
    assert cat["AP"] == pytest.approx(51 / 101, abs=1e-12)
    assert cat["AP50"] == pytest.approx(51 / 101, abs=1e-12)
    assert cat["recall"] == pytest.approx(0.5)
    assert (cat["num_preds"], cat["num_gt"]) == (2, 2)
    assert dog["AP"] == pytest.approx(0.3, abs=1e-12)
    assert (dog["AP50"], dog["AP75"]) == (pytest.approx(1.0), 0.0)
    assert dog["recall"] == pytest.approx(0.3)
    # the summary is the mean over classes with GT; the aggregates follow from the per-class APs
    assert s.summary["AP"] == pytest.approx((51 / 101 + 0.3) / 2, abs=1e-12)
    assert s.aggregates["top10_mAP"] == pytest.approx((51 / 101 + 0.3) / 2)
    assert s.aggregates["ap_spread"] == pytest.approx(51 / 101 - 0.3)


@pytest.mark.parametrize("scorer", SCORERS)
def test_crowd_region_hits_are_ignored_not_false_positives(scorer):
    gt = make_gt()
    dets = [{"image_id": 30, "category_id": 7, "bbox": [180, 100, 100, 90], "score": 0.99}]  # on the crowd region
    dets += [d for d in as_detections(gt, 0.5) if d["category_id"] == 7]
    s = score(gt, dets, scorer=scorer)
    assert s.per_class["dog"]["AP"] == pytest.approx(1.0)
    assert s.per_class["dog"]["num_preds"] == 4


@pytest.mark.parametrize("scorer", SCORERS)
def test_class_without_gt_is_null_and_json_is_strict(scorer, tmp_path):
    gt = make_gt()
    dets = as_detections(gt) + [{"image_id": 10, "category_id": 11, "bbox": [0, 0, 20, 20], "score": 0.9}]
    s = score(gt, dets, scorer=scorer)
    bird = s.per_class["bird"]
    assert bird == {"AP": None, "AP50": None, "AP75": None, "recall": None, "num_preds": 1, "num_gt": 0}
    # every box is medium: no small or large GT -> COCOeval's -1 becomes null
    assert s.summary["APs"] is None and s.summary["APl"] is None
    path = tmp_path / "per_class.json"
    write_json(path, {"summary": s.summary, "per_class": s.per_class, "aggregates": s.aggregates})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = read_json(path)  # refuses NaN / Infinity
    assert back["per_class"]["bird"]["AP"] is None
    assert set(back["summary"]) == set(SUMMARY_KEYS)


@pytest.mark.parametrize("scorer", SCORERS)
def test_empty_predictions_give_zeros_and_a_warning(scorer, caplog):
    gt = make_gt()
    with caplog.at_level(logging.WARNING, logger="mitdet.engine.scoring"):
        s = score(gt, [], scorer=scorer)
    assert "no detections" in caplog.text
    assert s.summary["AP"] == 0.0 and s.summary["AR100"] == 0.0
    assert s.per_class["cat"]["AP"] == 0.0 and s.per_class["cat"]["num_preds"] == 0
    assert s.per_class["bird"]["AP"] is None
    table = per_class_table(s, top_k=2)
    assert "TOP PERFORMING CLASSES" in table and "CLASSES NEEDING ATTENTION" in table


def test_image_ids_restrict_scoring_to_those_images():
    gt = make_gt()
    dets = as_detections(gt)
    dets = [d for d in dets if d["image_id"] != 20]  # image 20's objects are all missed
    assert score(gt, dets).summary["AP"] < 1.0
    s = score(gt, dets, image_ids=[10, 30])
    assert s.summary["AP"] == pytest.approx(1.0)
    assert s.per_class["cat"]["num_gt"] == 1 and s.num_images == 2
    with pytest.raises(ValueError, match="not in the ground truth"):
        score(gt, dets, image_ids=[10, 999])


@pytest.mark.parametrize("scorer", SCORERS)
def test_a_ground_truth_loaded_once_scores_like_a_fresh_one_every_time(scorer):
    gt = make_gt()
    half = [d for d in as_detections(gt) if d["image_id"] != 20]
    loaded = load_coco(gt, scorer)  # what the training loop keeps between validations
    for dets, ids in ((half, None), (as_detections(gt), [10, 30]), ([], None), (half, None)):
        a, b = score(loaded, dets, scorer=scorer, image_ids=ids), score(make_gt(), dets, scorer=scorer, image_ids=ids)
        assert (a.summary, a.per_class, a.pr_curves) == (b.summary, b.per_class, b.pr_curves)
    assert gt == make_gt()  # a dict passed in is copied, never changed


def test_results_on_unknown_images_fail_clearly():
    gt = make_gt()
    with pytest.raises(ValueError, match="image_id"):
        score(gt, [{"image_id": 12345, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="missing field"):
        score(gt, [{"image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5]}])


def noisy_detections(gt: dict, seed: int, drop=0.2, extra=0.3) -> list[dict]:
    """GT boxes jittered, some dropped, some duplicated at random places, random scores and some class swaps."""
    rng = random.Random(seed)
    cats = [c["id"] for c in gt["categories"]]
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    dets = []
    for a in gt["annotations"]:
        if rng.random() < drop:
            continue
        x, y, w, h = a["bbox"]
        j = 0.15 * max(w, h)
        box = [x + rng.uniform(-j, j), y + rng.uniform(-j, j), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        cat = a["category_id"] if rng.random() > 0.1 else rng.choice(cats)
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": rng.random()})
        if rng.random() < extra:
            W, H = sizes[a["image_id"]]
            dets.append({"image_id": a["image_id"], "category_id": cat,
                         "bbox": [rng.uniform(0, W / 2), rng.uniform(0, H / 2), rng.uniform(5, W / 2),
                                  rng.uniform(5, H / 2)], "score": rng.random()})
    return dets


def assert_scores_close(a, b, tol=1e-6):
    for k in SUMMARY_KEYS:
        assert (a.summary[k] is None) == (b.summary[k] is None), k
        if a.summary[k] is not None:
            assert abs(a.summary[k] - b.summary[k]) <= tol, k
    assert a.per_class.keys() == b.per_class.keys()
    for name in a.per_class:
        for k, v in a.per_class[name].items():
            w = b.per_class[name][k]
            assert (v is None) == (w is None), (name, k)
            if v is not None:
                assert abs(v - w) <= tol, (name, k, v, w)
    pa = np.array([r["precision"] for r in a.pr_curves])
    pb = np.array([r["precision"] for r in b.pr_curves])
    assert pa.shape == pb.shape and np.abs(pa - pb).max() <= tol


def test_faster_coco_eval_equals_pycocotools_with_crowd_regions(tmp_path):
    gt = make_gt()
    dets = noisy_detections(gt, seed=1, drop=0.0, extra=1.0)
    dets.append({"image_id": 30, "category_id": 7, "bbox": [182, 98, 96, 92], "score": 0.95})  # on the crowd region
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "det.json"
    write_json(gt_path, gt)
    write_json(det_path, dets)
    a = score(gt_path, read_json(det_path), scorer="pycocotools")
    b = score(gt_path, read_json(det_path), scorer="faster_coco_eval")
    assert 0.0 < a.summary["AP"] < 1.0
    assert_scores_close(a, b)


@pytest.fixture
def tiny50_gt():
    if not TINY50_VAL.exists():
        pytest.skip(f"COCO fixture absent: {TINY50_VAL} (the shared fixtures folder beside the repo)")
    return read_json(TINY50_VAL)


def test_faster_coco_eval_equals_pycocotools_on_real_coco(tiny50_gt):
    dets = noisy_detections(tiny50_gt, seed=2)
    a = score(TINY50_VAL, dets, scorer="pycocotools")
    b = score(TINY50_VAL, dets, scorer="faster_coco_eval")
    assert 0.1 < a.summary["AP"] < 0.9
    assert_scores_close(a, b)


@pytest.mark.parametrize("scorer", SCORERS)
def test_real_coco_ground_truth_as_detections_scores_one(tiny50_gt, scorer):
    s = score(TINY50_VAL, as_detections(tiny50_gt), scorer=scorer)
    assert s.summary["AP"] == pytest.approx(1.0) and s.summary["AP50"] == pytest.approx(1.0)
    with_gt = [r for r in s.per_class.values() if r["AP"] is not None]
    assert len(with_gt) == 48 and all(r["AP"] == pytest.approx(1.0) for r in with_gt)
    assert sum(r["AP"] is None for r in s.per_class.values()) == 80 - 48


def test_metrics_match_pycocotools_run_directly_on_the_written_file(tiny50_gt, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = noisy_detections(tiny50_gt, seed=3)
    pred_path = tmp_path / "predictions.json"
    write_json(pred_path, dets, indent=None)
    ours = score(TINY50_VAL, read_json(pred_path), scorer="faster_coco_eval")

    gt = COCO(str(TINY50_VAL))
    ev = COCOeval(gt, gt.loadRes(str(pred_path)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for i, key in enumerate(SUMMARY_KEYS):
        ref = ev.stats[i]
        assert (ours.summary[key] is None) if ref == -1 else ours.summary[key] == pytest.approx(ref, abs=1e-6), key
    # per class: person's AP straight from COCOeval's precision array
    k = ev.params.catIds.index(1)
    p = ev.eval["precision"][:, :, k, 0, 2]
    assert ours.per_class["person"]["AP"] == pytest.approx(float(p[p > -1].mean()), abs=1e-6)
    assert ours.per_class["person"]["num_gt"] == len(gt.getAnnIds(catIds=[1], iscrowd=False))
    assert json.loads(pred_path.read_text()) == dets


def test_table_lists_best_and_worst_classes_once(tiny50_gt):
    s = score(TINY50_VAL, noisy_detections(tiny50_gt, seed=4))
    table = per_class_table(s, top_k=5)
    top, bottom = table.split("CLASSES NEEDING ATTENTION")
    ranked = sorted(((r["AP"], n) for n, r in s.per_class.items() if r["AP"] is not None), key=lambda t: (-t[0], t[1]))
    best, worst = ranked[0][1], ranked[-1][1]
    assert f"\n{best} " in top and f"\n{worst} " in bottom and f"\n{worst} " not in top
    assert "preds/GT" in top and "recall" in top
    small = per_class_table(score(make_gt(), as_detections(make_gt())), top_k=10)
    assert "every class with GT is listed above" in small
