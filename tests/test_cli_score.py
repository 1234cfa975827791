"""`mitdet score`: any COCO results file against any COCO ground truth, as pycocotools scores it, bad entries named."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from tests.cli_fixtures import run_cli

VAL_GT = "coco2017-tiny50/annotations/instances_val2017.json"


def perturbed_detections(gt: dict, seed: int = 0, drop: float = 0.15) -> list[dict]:
    """The ground truth as detections: boxes jittered, random scores, some dropped, a few false positives."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        if a.get("iscrowd") or rng.random() < drop:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.07, 4) * [w, h, w, h]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                    "bbox": [max(0.0, x + j[0]), max(0.0, y + j[1]), abs(w + j[2]), abs(h + j[3])],
                    "score": float(rng.random())})
    for im in gt["images"][::3]:
        out.append({"image_id": im["id"], "category_id": int(rng.choice(cats)), "bbox": [5.0, 5.0, 40.0, 30.0],
                    "score": float(rng.random() * 0.5)})
    return out


def generated_gt(seed: int = 0) -> dict:
    """20 images, 3 categories (ids 2, 5, 11; one without any object), boxes of all three COCO area ranges."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"},
                                                          {"id": 11, "name": "unseen"}]}
    for i in range(1, 21):
        gt["images"].append({"id": 10 * i, "file_name": f"{i:03d}.jpg", "width": 640, "height": 480})
        for _ in range(int(rng.integers(0, 5))):
            side = float(rng.choice([20, 60, 200])) * float(rng.uniform(0.8, 1.2))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 10 * i,
                                      "category_id": int(rng.choice([2, 5])), "iscrowd": 0, "area": side * side,
                                      "bbox": [float(rng.uniform(0, 400)), float(rng.uniform(0, 250)), side, side]})
    return gt


def pycocotools_stats(gt_path, results) -> tuple[list[float], dict[int, float]]:
    """COCOeval run directly: its 12 stats and per-category AP (mean of valid precision)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][:, :, :, 0, -1]
    per_cat = {c: (float(np.mean(p[p > -1])) if (p > -1).any() else None)
               for c, p in zip(ev.params.catIds, np.moveaxis(prec, 2, 0), strict=True)}
    return [float(s) for s in ev.stats], per_cat


def printed_stats(out: str) -> list[float | None]:
    lines = [ln for ln in out.splitlines() if ln.startswith(" Average")]
    assert len(lines) == 12
    return [None if ln.endswith("n/a") else float(ln.rsplit("=", 1)[1]) for ln in lines]


def _check_against_pycocotools(capsys, tmp_path, gt_path, results, scorer):
    (tmp_path / "dets.json").write_text(json.dumps(results))
    code, out, err = run_cli(["score", str(gt_path), str(tmp_path / "dets.json"), "--out", str(tmp_path / "out"),
                              "--scorer", scorer], capsys)
    assert code == 0, err
    stats, per_cat = pycocotools_stats(gt_path, results)
    for got, want in zip(printed_stats(out), stats, strict=True):
        assert (got is None and want == -1) or got == pytest.approx(round(want, 3), abs=1e-9)
    eval_json = json.loads((tmp_path / "out" / "eval.json").read_text())
    for key, want in zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"), stats, strict=False):
        assert (eval_json[key] is None and want == -1) or eval_json[key] == pytest.approx(want, abs=1e-12)
    assert eval_json["images_per_s"] is None and eval_json["params_m"] is None and eval_json["gflops"] is None
    per_class = json.loads((tmp_path / "out" / "per_class.json").read_text())
    names = {c["id"]: c["name"] for c in json.loads(gt_path.read_text())["categories"]}
    for cat, ap in per_cat.items():
        assert per_class[names[cat]]["AP"] == (None if ap is None else pytest.approx(ap, abs=1e-12))
    assert "TOP PERFORMING CLASSES" in out and "CLASSES NEEDING ATTENTION" in out
    return eval_json


@pytest.mark.parametrize("scorer", ["pycocotools", "faster_coco_eval"])
def test_real_coco_ground_truth_scores_as_pycocotools_does(tmp_path, capsys, fixtures_dir, scorer):
    gt_path = fixtures_dir / VAL_GT
    results = perturbed_detections(json.loads(gt_path.read_text()))
    eval_json = _check_against_pycocotools(capsys, tmp_path, gt_path, results, scorer)
    assert 0.3 < eval_json["AP"] < 0.9 and eval_json["num_images"] == 50


def test_generated_ground_truth_scores_as_pycocotools_does(tmp_path, capsys):
    gt = generated_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    eval_json = _check_against_pycocotools(capsys, tmp_path, tmp_path / "gt.json", perturbed_detections(gt),
                                           "pycocotools")
    assert eval_json["num_images"] == 20
    per_class = json.loads((tmp_path / "out" / "per_class.json").read_text())
    assert per_class["unseen"]["AP"] is None and per_class["unseen"]["num_gt"] == 0


def test_the_ground_truth_itself_scores_one(tmp_path, capsys):
    gt = generated_gt(1)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    code, out, _ = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json")], capsys)
    assert code == 0 and printed_stats(out)[:3] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("entry, message", [
    ({"image_id": 999, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}, "image_id 999 is not an image of"),
    ({"image_id": 10, "category_id": 77, "bbox": [1, 2, 3, 4], "score": 0.5}, "category_id 77 is not a category"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, math.nan, 4], "score": 0.5}, "holds a non-finite number"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, math.inf, 4], "score": 0.5}, "holds a non-finite number"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, -3, 4], "score": 0.5}, "has a negative value"),
    ({"image_id": 10, "category_id": 2, "bbox": [-1, 2, 3, 4], "score": 0.5}, "has a negative value"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, 3], "score": 0.5}, "is not [x, y, width, height]"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, 3, 4], "score": math.nan}, "score nan is not a finite"),
    ({"image_id": 10, "category_id": 2, "bbox": [1, 2, 3, 4]}, "lacks score"),
    ("a string", "is a str, not an object"),
])
def test_a_bad_entry_is_named(tmp_path, capsys, entry, message):
    (tmp_path / "gt.json").write_text(json.dumps(generated_gt()))
    good = {"image_id": 10, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}
    (tmp_path / "d.json").write_text(json.dumps([good, good, entry]))  # json writes NaN/Infinity as Python does
    code, out, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json")], capsys)
    assert code == 1 and err.count("\n") == 1 and out == ""
    assert err.startswith(f"error: {tmp_path / 'd.json'}: entry [2]: ") and message in err


@pytest.mark.parametrize("content, message", [
    ('{"results": []}', "not a COCO results list"),
    ('"nothing"', "is a JSON str, not a COCO results list"),
    ("[{", "not valid JSON"),
])
def test_a_file_that_is_not_a_results_list(tmp_path, capsys, content, message):
    (tmp_path / "gt.json").write_text(json.dumps(generated_gt()))
    (tmp_path / "d.json").write_text(content)
    code, _, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json")], capsys)
    assert code == 1 and err.startswith("error: ") and message in err


def test_a_bad_ground_truth_and_missing_files(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps({"images": []}))
    (tmp_path / "d.json").write_text("[]")
    code, _, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json")], capsys)
    assert code == 1 and "field `annotations` is missing" in err
    code, _, err = run_cli(["score", str(tmp_path / "none.json"), str(tmp_path / "d.json")], capsys)
    assert code == 1 and "not found" in err
    (tmp_path / "gt.json").write_text(json.dumps(generated_gt()))
    code, _, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "none.json")], capsys)
    assert code == 1 and "no such predictions file" in err


def test_an_empty_list_scores_zero_with_a_warning(tmp_path, capsys, caplog):
    (tmp_path / "gt.json").write_text(json.dumps(generated_gt()))
    (tmp_path / "d.json").write_text("[]")
    code, out, _ = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json"), "--out",
                            str(tmp_path / "o")], capsys)
    assert code == 0 and printed_stats(out) == [0.0] * 12
    assert "holds no detections" in caplog.text
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["AP"] == 0.0


def test_a_predict_file_is_matched_by_file_name_and_scores_only_its_images(tmp_path, capsys):
    gt = generated_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    predicted = gt["images"][:5]  # `mitdet predict` ran on 5 of the 20 images, numbering them 1..5
    ids = {im["id"]: n for n, im in enumerate(predicted, 1)}
    doc = {"images": [{"id": ids[im["id"]], "file_name": f"photos/{im['file_name']}", "width": 640, "height": 480}
                      for im in predicted],
           "categories": gt["categories"],
           "annotations": [{"id": k, "image_id": ids[a["image_id"]], "category_id": a["category_id"],
                            "bbox": a["bbox"], "score": 0.9} for k, a in enumerate(gt["annotations"], 1)
                           if a["image_id"] in ids]}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    code, out, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "p.json"), "--out",
                              str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert printed_stats(out)[0] == 1.0  # the GT of those 5 images, found exactly; the other 15 not counted
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["num_images"] == 5
    doc["images"][0]["file_name"] = "elsewhere.jpg"
    (tmp_path / "p.json").write_text(json.dumps(doc))
    code, _, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "p.json")], capsys)
    assert code == 1 and "images[0]: file_name 'elsewhere.jpg' is not an image of the ground truth" in err


@pytest.mark.parametrize("scorer", ["fast", "faster_coco_eval"])
def test_score_file_gives_pycocotools_stats_with_every_scorer(tmp_path, fixtures_dir, scorer):
    from mitdet.engine.score_files import score_file

    (tmp_path / "gt.json").write_text(json.dumps(generated_gt()))
    for gt_path in (fixtures_dir / VAL_GT, tmp_path / "gt.json"):
        results = perturbed_detections(json.loads(gt_path.read_text()), seed=2)
        (tmp_path / "d.json").write_text(json.dumps(results))
        stats, per_cat = pycocotools_stats(gt_path, results)
        scores = score_file(gt_path, tmp_path / "d.json", scorer=scorer)
        assert scores.scorer == scorer
        for key, want in zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
                             stats, strict=True):
            got = scores.summary[key]
            assert (got is None and want == -1) or abs(got - want) <= 1e-12, (key, got, want)
        names = {c["id"]: c["name"] for c in json.loads(gt_path.read_text())["categories"]}
        for cat, ap in per_cat.items():
            got = scores.per_class[names[cat]]["AP"]
            assert (got is None and ap is None) or abs(got - ap) <= 1e-12, (cat, got, ap)


def test_a_bad_entry_deep_in_a_long_list_is_named_by_the_bulk_checks(tmp_path, capsys):
    gt = generated_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    good = perturbed_detections(gt) * 80
    assert len(good) > 3100
    for i, bad, message in ((2500, {"bbox": [1.0, -2.0, 3.0, 4.0]}, "has a negative value"),
                            (3001, {"image_id": 5}, "image_id 5 is not an image of"),
                            (1234, {"score": True}, "score True is not a finite number")):
        entries = list(good)
        entries.insert(i, dict(good[0], **bad))
        (tmp_path / "d.json").write_text(json.dumps(entries))
        code, _, err = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "d.json")], capsys)
        assert code == 1 and f"entry [{i}]: " in err and message in err, err


def test_scoring_a_file_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, mitdet.engine.score_files; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
