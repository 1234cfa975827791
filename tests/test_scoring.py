"""COCO scoring: known per-class AP on hand-made ground truth, all 12 stats and per-class AP equal to pycocotools run
directly, strict JSON, bad input named, the per-class table."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from mitdet.engine.scoring import STAT_KEYS, STAT_SPECS, SUMMARY_KEYS, load_coco, per_class_table, score
from mitdet.errors import DataError
from mitdet.io import read_json, write_json

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TINY50_VAL = FIXTURES / "coco2017-tiny50" / "annotations" / "instances_val2017.json"
SCORERS = ["pycocotools", "faster_coco_eval", "fast"]


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
    one = pytest.approx(1.0)
    assert s.per_class["cat"] == {"AP": one, "AP50": one, "AP75": one, "APs": None, "APm": one, "APl": None,
                                  "AR1": one, "AR10": one, "AR100": one, "ARs": None, "ARm": one, "ARl": None,
                                  "recall": one, "num_preds": 2, "num_gt": 2}
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
    assert bird == {**{k: None for k in STAT_KEYS}, "recall": None, "num_preds": 1, "num_gt": 0}
    assert s.per_class["dog"]["APs"] is None and s.per_class["dog"]["APm"] == pytest.approx(1.0)
    # every box is medium: no small or large GT -> COCOeval's -1 becomes null
    assert s.summary["APs"] is None and s.summary["APl"] is None
    assert s.summary["ARs"] is None and s.summary["ARl"] is None and s.summary["ARm"] == pytest.approx(1.0)
    path = tmp_path / "per_class.json"
    write_json(path, {"summary": s.summary, "per_class": s.per_class, "aggregates": s.aggregates})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = read_json(path)  # refuses NaN / Infinity
    assert back["per_class"]["bird"]["AP"] is None
    assert list(back["summary"]) == list(STAT_KEYS) and list(SUMMARY_KEYS) == list(STAT_KEYS[:9])


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
    assert "no AP yet (AP 0, 2 of 2 classes with GT): cat, dog" in table


def test_image_ids_restrict_scoring_to_those_images():
    gt = make_gt()
    dets = as_detections(gt)
    dets = [d for d in dets if d["image_id"] != 20]  # image 20's objects are all missed
    assert score(gt, dets).summary["AP"] < 1.0
    s = score(gt, dets, image_ids=[10, 30])
    assert s.summary["AP"] == pytest.approx(1.0)
    assert s.per_class["cat"]["num_gt"] == 1 and s.num_images == 2
    with pytest.raises(DataError, match="not in the ground truth"):
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
    ok = {"image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(DataError, match="image_id"):
        score(gt, [ok, {**ok, "image_id": 12345}])
    bad = [({"image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5]}, "missing field"),
           ({**ok, "image_id": True}, "must be integers"), ({**ok, "category_id": 3.0}, "must be integers"),
           ({**ok, "bbox": [0, 0, 5]}, "bbox must be"), ({**ok, "bbox": [0, 0, "5", 5]}, "bbox must be"),
           ({**ok, "bbox": [0, 0, float("nan"), 5]}, "bbox must be"), ({**ok, "score": float("inf")}, "score must"),
           ({**ok, "score": None}, "score must"), ([10, 3, [0, 0, 5, 5], 0.5], "not an object")]
    for entry, message in bad:
        with pytest.raises(DataError, match=rf"results: entry \[1\]: .*{message}"):
            score(gt, [ok, entry])


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


def pycocotools_reference(gt_path, det_path, image_ids=None):
    """COCOeval run directly, as its users do: (the 12 stats, the per-class precision/recall arrays, params)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(det_path)), "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, gt


def assert_equals_pycocotools(ours, ev, gt, tol=1e-6):
    """All 12 stats, and every class's AP, AP50, AP75, APs/m/l and AR1..ARl, against COCOeval's own arrays."""
    for i, key in enumerate(STAT_KEYS):
        ref = float(ev.stats[i])
        assert (ours.summary[key] is None) == (ref == -1), key
        if ref != -1:
            assert abs(ours.summary[key] - ref) <= tol, (key, ours.summary[key], ref)
    p, precision, recall = ev.params, ev.eval["precision"], ev.eval["recall"]
    t = {0.5: 0, 0.75: 5}
    for k, cat_id in enumerate(p.catIds):
        row = ours.per_class[gt.cats[cat_id]["name"]]
        for key, (kind, iou, area, max_dets) in STAT_SPECS.items():
            a, m = p.areaRngLbl.index(area), p.maxDets.index(max_dets)
            ref = precision[:, :, k, a, m] if kind == "precision" else recall[:, k, a, m]
            ref = ref[t[iou]] if iou is not None else ref
            valid = ref[ref > -1]
            if valid.size == 0:
                assert row[key] is None, (cat_id, key)
            else:
                assert abs(row[key] - float(valid.mean())) <= tol, (cat_id, key, row[key], float(valid.mean()))
        assert row["num_gt"] == len(gt.getAnnIds(imgIds=p.imgIds, catIds=[cat_id], iscrowd=False))


def generated_coco(seed: int = 0):
    """Ground truth with crowd regions, empty images, a class without GT, areas unlike the box area (as segments
    are) and on the small/medium/large boundaries; detections with tied scores, a pair of 130 detections (beyond
    maxDets 100), detections on empty images, on the class without GT and on an unknown category."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"c{i}"} for i in (2, 5, 9, 14, 23, 30)]  # 30: no GT
    images, anns, dets = [], [], []
    for image_id in range(1, 61):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        images.append({"id": image_id * 7, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        n = 0 if image_id <= 6 else int(rng.integers(1, 12))
        for _ in range(n):
            bw, bh = np.exp(rng.uniform(np.log(4), np.log(w * 0.8))), np.exp(rng.uniform(np.log(4), np.log(h * 0.8)))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)]
            area = float(rng.choice([32.0 ** 2, 96.0 ** 2])) if rng.random() < 0.05 else bw * bh * rng.uniform(0.5, 1)
            anns.append({"id": len(anns) + 1, "image_id": image_id * 7, "category_id": int(rng.choice([2, 5, 9, 14, 23])),
                         "bbox": box, "area": float(area), "iscrowd": int(rng.random() < 0.08)})
    for a in anns:
        x, y, bw, bh = a["bbox"]
        for j in range(int(rng.integers(0, 4))):
            s = 0.03 * (1 + 2 * j) * max(bw, bh)
            cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice([2, 5, 9, 14, 23, 30]))
            dets.append({"image_id": a["image_id"], "category_id": cat, "score": round(float(rng.random()), 2),
                         "bbox": [x + rng.normal(0, s), y + rng.normal(0, s), bw * rng.uniform(0.7, 1.3),
                                  bh * rng.uniform(0.7, 1.3)]})
    for im in images:
        for _ in range(int(rng.integers(0, 8))):
            w, h = im["width"], im["height"]
            cat = int(rng.choice([2, 5, 9, 14, 23, 30, 99]))  # 99: not a category of the ground truth
            dets.append({"image_id": im["id"], "category_id": cat, "score": round(float(rng.random()), 2),
                         "bbox": [float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2)),
                                  float(rng.uniform(2, w / 2)), float(rng.uniform(2, h / 2))]})
    crowded = next(a for a in anns if not a["iscrowd"])
    x, y, bw, bh = crowded["bbox"]
    dets += [{"image_id": crowded["image_id"], "category_id": crowded["category_id"], "score": round(0.3 + i / 300, 2),
              "bbox": [x + i % 5, y + i % 3, bw, bh]} for i in range(130)]
    order = rng.permutation(len(dets))  # detections in no particular order, as a results file may hold them
    return {"images": images, "annotations": anns, "categories": cats}, [dets[i] for i in order]


@pytest.mark.parametrize("scorer", SCORERS)
def test_all_12_stats_and_per_class_equal_pycocotools_on_generated_data(scorer, tmp_path, caplog):
    gt, dets = generated_coco()
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "det.json"
    write_json(gt_path, gt)
    write_json(det_path, dets, indent=None)
    ev, coco = pycocotools_reference(gt_path, det_path)
    with caplog.at_level(logging.WARNING, logger="mitdet.engine.scoring"):
        ours = score(gt_path, det_path, scorer=scorer)
    assert "category ids absent from the ground truth ([99])" in caplog.text
    assert 0.05 < ours.summary["AP"] < 0.9 and ours.summary["APs"] is not None and ours.summary["ARl"] is not None
    assert ours.per_class["c30"]["AP"] is None and ours.per_class["c30"]["num_preds"] > 0
    assert_equals_pycocotools(ours, ev, coco)
    # a subset of the images, one of them empty, scored from the list
    subset = [im["id"] for im in gt["images"][::3]]
    ev, coco = pycocotools_reference(gt_path, det_path, image_ids=subset)
    assert_equals_pycocotools(score(gt, read_json(det_path), scorer=scorer, image_ids=subset), ev, coco)


@pytest.mark.parametrize("scorer", SCORERS)
def test_all_12_stats_and_per_class_equal_pycocotools_on_real_coco(tiny50_gt, scorer, tmp_path):
    dets = noisy_detections(tiny50_gt, seed=3)
    pred_path = tmp_path / "predictions.json"
    write_json(pred_path, dets, indent=None)
    ev, coco = pycocotools_reference(TINY50_VAL, pred_path)
    ours = score(TINY50_VAL, read_json(pred_path), scorer=scorer)
    assert_equals_pycocotools(ours, ev, coco)
    assert json.loads(pred_path.read_text()) == dets


def test_a_results_file_scores_like_its_list_and_the_list_is_left_alone(tmp_path):
    gt, dets = generated_coco(seed=5)
    path = tmp_path / "det.json"
    write_json(path, dets)
    kept = copy.deepcopy(dets)
    for scorer, parts in (("faster_coco_eval", {"iou", "evaluate_accumulate"}), ("fast", {"evaluate", "accumulate"})):
        a, b = score(gt, path, scorer=scorer), score(gt, dets, scorer=scorer)
        assert (a.summary, a.per_class, a.pr_curves) == (b.summary, b.per_class, b.pr_curves)
        assert dets == kept  # no id/area/segmentation added to the caller's dicts
        assert set(a.timings) >= {"read_json", "load_results", "per_class", *parts}
    (tmp_path / "bad.json").write_text('{"image_id": 1}')
    with pytest.raises(DataError, match="not a list of COCO results"):
        score(gt, tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        score(gt, tmp_path / "broken.json")


def test_the_loaded_ground_truth_carries_its_scorer():
    gt = make_gt()
    for scorer in SCORERS:
        loaded = load_coco(gt, scorer=scorer)
        assert score(loaded, as_detections(gt)).scorer == scorer  # no scorer given: the loaded one's
        other = next(s for s in SCORERS if s != scorer)
        with pytest.raises(DataError, match=f"loaded for {scorer}, not {other}"):
            score(loaded, as_detections(gt), scorer=other)
    assert score(gt, as_detections(gt)).scorer == "fast"  # the default, as params' evaluate.scorer
    assert load_coco(gt, "faster_coco_eval").__class__.__module__.startswith("faster_coco_eval")
    with pytest.raises(DataError, match="not known"):
        score(gt, [], scorer="detectron")


def test_table_says_no_ap_yet_instead_of_ranking_ties_at_zero():
    gt = make_gt()
    gt["categories"] += [{"id": 40 + i, "name": n} for i, n in enumerate(("ant", "bee", "cow"))]
    for i, cat in enumerate((40, 41, 42)):
        gt["annotations"].append({"id": 100 + i, "image_id": 10, "category_id": cat, "bbox": [200, 100, 40, 40],
                                  "area": 1600, "iscrowd": 0})
    s = score(gt, [d for d in as_detections(gt) if d["category_id"] == 7])  # dog found; cat, ant, bee, cow not
    table = per_class_table(s, top_k=3)
    top, rest = table.split("CLASSES NEEDING ATTENTION")
    assert "\ndog " in top and "\nant " not in top and "\ncat " not in top
    assert "no AP yet (AP 0, 4 of 5 classes with GT): ant, bee, cat, cow" in rest
    assert "(every class with AP above 0 is listed above)" in rest
    nothing = per_class_table(score(gt, []), top_k=3)
    assert "(no AP yet: no class has AP above 0)" in nothing and "\nant " not in nothing


def test_table_lists_best_and_worst_classes_once(tiny50_gt):
    s = score(TINY50_VAL, noisy_detections(tiny50_gt, seed=4))
    table = per_class_table(s, top_k=5)
    top, bottom = table.split("CLASSES NEEDING ATTENTION")
    ranked = sorted(((r["AP"], n) for n, r in s.per_class.items() if r["AP"]), key=lambda t: (-t[0], t[1]))
    best, worst = ranked[0][1], ranked[-1][1]
    assert f"\n{best} " in top and f"\n{worst} " in bottom and f"\n{worst} " not in top
    assert "preds/GT" in top and "recall" in top
    small = per_class_table(score(make_gt(), as_detections(make_gt())), top_k=10)
    assert "every class with AP above 0 is listed above" in small and "no AP yet" not in small


@pytest.mark.parametrize("scorer", SCORERS)
def test_ground_truth_without_usable_annotation_ids_is_named(scorer):
    for bad in (0, None, "7"):
        gt = make_gt()
        if bad is None:
            del gt["annotations"][2]["id"]
        else:
            gt["annotations"][2]["id"] = bad
        with pytest.raises(DataError, match=r"ground truth: annotations\[2\] has id"):
            load_coco(gt, scorer)
