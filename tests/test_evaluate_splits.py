"""Extra test splits (data/index/layout.json "tests"): evaluate_<b> scores each one like val, pycocotools-exact, with
its own predictions and per-class table; the val outputs stay as they are; the report compares the splits."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from mitdet.engine.evaluate import EVAL_KEYS, SPLIT_KEYS, TEST_SCORE_KEYS, evaluate_backbone, load_test_splits
from mitdet.errors import DataError
from mitdet.io import read_json, write_json
from mitdet.params import EvaluateParams, ReportParams, RoiParams, RpnParams, to_dict
from mitdet.paths import REPORT_AP_BY_SPLIT_CSV, REPORT_JSON, REPORT_MD, BackbonePaths
from mitdet.report import build_report
from tests.train_fixtures import CATEGORIES, _image, tiny_model, write_index

B = "mit_b0"
BP = BackbonePaths(B)
TESTS = {"day": (5, 21), "night": (3, 22)}  # name -> (images, seed)
STAT_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
VAL_FILES = (BP.predictions, BP.per_class_metrics, BP.per_class_ap_csv, BP.pr_curve_csv)


def add_test_split(root, name: str, n: int, seed: int, first_id: int) -> None:
    """data/index/<name>.jsonl and instances_<name>.json per the index contract (real JPEGs, 64 px)."""
    rng = np.random.default_rng(seed)
    index, images_dir = root / "data/index", root / "data/images"
    lines, coco = [], {"images": [], "annotations": [], "categories": [
        {"id": c["id"], "name": c["name"]} for c in CATEGORIES]}
    for image_id in range(first_id, first_id + n):
        img, objects = _image(rng, 64)
        file = images_dir / f"{name}_{image_id:04d}.jpg"
        cv2.imwrite(str(file), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        coco["images"].append({"id": image_id, "file_name": file.name, "width": 64, "height": 64})
        rec = {"image_id": image_id, "file": str(file), "width": 64, "height": 64, "boxes": [], "category_ids": [],
               "labels": [], "iscrowd": [], "ann_ids": []}
        for k, (box, cat) in enumerate(objects):
            ann_id = 100 * image_id + k
            coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat["id"], "bbox": box,
                                        "area": box[2] * box[3], "iscrowd": 0})
            for key, value in (("boxes", box), ("category_ids", cat["id"]), ("labels", cat["label"]),
                               ("iscrowd", 0), ("ann_ids", ann_id)):
                rec[key].append(value)
        lines.append(json.dumps(rec))
    (index / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (index / f"instances_{name}.json").write_text(json.dumps(coco))


def save_untrained_model(root) -> None:
    """mit_b0 at 64 px, score_thresh 0, box regression zeroed: an untrained model's boxes are then its anchors, of
    which some overlap the large shapes, so the scores are not all 0."""
    from mitdet.models import build_detector, save_inference_model
    torch.manual_seed(0)
    params = dataclasses.replace(tiny_model(64), rpn=RpnParams(pre_nms_top_n_test=1000, post_nms_top_n_test=1000),
                                 roi=RoiParams(score_thresh=0.0, detections_per_img=100))
    model = build_detector(B, len(CATEGORIES) + 1, params)
    with torch.no_grad():
        for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    save_inference_model(model, {"backbone": B, "num_classes": len(CATEGORIES) + 1, "categories": CATEGORIES,
                                 "model": to_dict(params)}, root / BP.model_dir)


EVALUATE = EvaluateParams(batch_size=2, scorer="faster_coco_eval", samples=1, sample_score_thresh=0.0,
                          speed_images=1, speed_warmup=0, device="cpu", amp="off", num_workers=0)


def evaluate(root) -> dict:
    return evaluate_backbone(B, EVALUATE, root=root, progress=False)


def write_layout(root, tests: list[str]) -> None:
    write_json(root / "data/index/layout.json", {"tests": tests, "aux_channels": 0})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One index (train, val, day, night; one night image rejected by the index), one model, evaluated twice:
    first with no layout.json (kept under before/), then with the two test splits."""
    root = tmp_path_factory.mktemp("splits")
    write_index(root, n_train=2, n_val=4)
    for n, (name, (count, seed)) in enumerate(TESTS.items()):
        add_test_split(root, name, count, seed, first_id=1000 * (n + 1))
    (root / "data/index/rejected.csv").write_text(
        "split,file,image_id,ann_id,reason\nnight,data/images/x.jpg,1999,,unreadable_image\n"
        "night,data/images/y.jpg,1998,7,box_too_small\nval,data/images/z.jpg,999,,unreadable_image\n")
    save_untrained_model(root)
    before = evaluate(root)
    shutil.copytree(root / "metrics", root / "before/metrics")
    shutil.copytree(root / "plots", root / "before/plots")
    shutil.copytree(root / "data/predictions", root / "before/data/predictions")
    write_layout(root, list(TESTS))
    return root, before, evaluate(root)


def pycocotools_stats(gt_path, results_path, cat_id: int | None = None) -> list[float | None]:
    """COCOeval's 12 stats straight from pycocotools, -1 (no GT in that range) as None."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
        if cat_id is not None:
            ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [None if s == -1 else float(s) for s in ev.stats]


def assert_stats(ours: dict, theirs: list) -> None:
    for key, value in zip(STAT_ORDER, theirs, strict=True):
        assert (ours[key] is None) if value is None else ours[key] == pytest.approx(value, abs=1e-9), key


def test_each_test_split_is_scored_exactly_as_pycocotools_does(project):
    root, _, metrics = project
    eval_json = read_json(root / BP.eval_metrics)
    assert eval_json == metrics and list(eval_json["tests"]) == ["day", "night"]
    assert_stats(eval_json, pycocotools_stats(root / "data/index/instances_val.json", root / BP.predictions))
    some_ap = 0.0  # the best per-class AP50 of a test split
    for name, (count, _) in TESTS.items():
        entry = eval_json["tests"][name]
        assert list(entry)[:len(SPLIT_KEYS)] == list(SPLIT_KEYS) and entry["num_images"] == count
        assert entry["images_skipped"] == 0 and "ms_per_image" not in entry  # speed: once, on val
        gt, preds = root / f"data/index/instances_{name}.json", root / BP.test_predictions(name)
        results = read_json(preds)
        gt_ids = {im["id"] for im in read_json(gt)["images"]}
        assert results and {r["image_id"] for r in results} <= gt_ids  # this split's images, not val's
        assert_stats(entry, pycocotools_stats(gt, preds))
        for c in CATEGORIES:
            row, theirs = entry["per_class"][c["name"]], pycocotools_stats(gt, preds, c["id"])
            assert (row["AP"] is None) if theirs[0] is None else row["AP"] == pytest.approx(theirs[0], abs=1e-9)
            assert row["num_gt"] == sum(a["category_id"] == c["id"] for a in read_json(gt)["annotations"])
            some_ap = max(some_ap, row["AP50"] or 0.0)
        with open(root / BP.test_per_class_ap_csv(name), newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["class"] for r in rows} == {n for n, r in entry["per_class"].items() if r["AP"] is not None}
    assert some_ap > 0  # the comparison above is not one of zeros only
    assert eval_json["tests"]["night"]["images_left_out_by_index"] == 1  # its image row, not its box row
    assert eval_json["tests"]["day"]["images_left_out_by_index"] == 0


def test_scores_json_holds_the_few_test_split_keys_under_the_backbone(project):
    root, _, metrics = project
    scores = read_json(root / BP.scores)
    assert list(scores) == [B]
    assert scores[B]["tests"] == {name: {k: metrics["tests"][name][k] for k in TEST_SCORE_KEYS} for name in TESTS}
    assert {k: v for k, v in scores[B].items() if k != "tests"} == {k: metrics[k] for k in STAT_ORDER}


def test_val_outputs_are_unchanged_by_test_splits(project):
    root, before, after = project
    assert "tests" not in before and "tests" not in read_json(root / "before" / BP.scores)[B]
    assert list(before) == [*EVAL_KEYS, "images_skipped", "images_left_out_by_index", "machine"]
    for rel in VAL_FILES:  # predictions, per-class table and plots of val: the same bytes
        assert (root / rel).read_bytes() == (root / "before" / rel).read_bytes(), rel
    timings = ("images_per_s", "ms_per_image", "machine", "tests")
    assert {k: v for k, v in after.items() if k not in timings} == {k: v for k, v in before.items() if k not in timings}
    # the declared folders exist without a test split, empty
    assert not any((root / "before" / BP.test_predictions_dir).iterdir())
    assert not any((root / "before" / BP.test_per_class_ap_dir).iterdir())


def test_a_split_dropped_from_the_layout_leaves_no_stale_files(project, tmp_path):
    root, _, _ = project
    work = tmp_path / "p"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("before"))
    write_layout(work, ["night"])
    metrics = evaluate(work)
    assert list(metrics["tests"]) == ["night"]
    assert sorted(p.name for p in (work / BP.test_predictions_dir).iterdir()) == ["night.json"]
    assert sorted(p.name for p in (work / BP.test_per_class_ap_dir).iterdir()) == ["night.csv"]
    # a split's predictions do not depend on which other splits are scored
    assert (work / BP.test_predictions("night")).read_bytes() == (root / BP.test_predictions("night")).read_bytes()


def test_layout_errors_name_the_file(tmp_path):
    write_index(tmp_path, n_train=1, n_val=1)
    assert load_test_splits(tmp_path, ["val"]) == {}  # no layout.json: no test split
    for bad in ("day", ["val"], ["day", "day"], ["../x"], [".hidden"]):
        write_json(tmp_path / "data/index/layout.json", {"tests": bad, "aux_channels": 0})
        with pytest.raises(DataError, match="layout.json"):
            load_test_splits(tmp_path, ["val"])
    write_layout(tmp_path, ["night"])  # named, never indexed
    with pytest.raises(DataError, match="instances_night.json"):
        load_test_splits(tmp_path, ["val"])


def test_report_compares_the_splits(project):
    root, _, metrics = project
    out = build_report([B], ReportParams(), root=root)
    splits = out["by_split"]
    assert splits["splits"] == ["val", "day", "night"] and read_json(root / REPORT_JSON) == out
    for name in splits["splits"]:
        source = metrics if name == "val" else metrics["tests"][name]
        assert splits["backbones"][B][name] == {"AP": source["AP"], "AP50": source["AP50"], "AP75": source["AP75"],
                                                "num_images": source["num_images"]}
    val_pc = read_json(root / BP.per_class_metrics)
    for name in TESTS:
        for row in splits["classes"][name]:
            test_ap = metrics["tests"][name]["per_class"][row["class"]]["AP"]
            assert (row["val_AP"], row["AP"]) == (val_pc[row["class"]]["AP"], test_ap)
            assert row["delta"] == pytest.approx(test_ap - row["val_AP"])
    md = (root / REPORT_MD).read_text()
    assert "### By split" in md and "#### Classes on night against val" in md
    night = next(line for line in md.splitlines() if line.startswith(f"| {B} | night |"))
    delta = metrics["tests"]["night"]["AP"] - metrics["AP"]
    assert f"| {metrics['tests']['night']['AP']:.3f} |" in night and night.rstrip(" |").endswith(f"{delta:+.3f}")
    with open(root / REPORT_AP_BY_SPLIT_CSV, newline="") as f:
        assert [(r["backbone"], r["split"]) for r in csv.DictReader(f)] == [(B, s) for s in ("val", "day", "night")]


def test_report_without_test_splits_is_as_before(project, tmp_path):
    root, _, _ = project
    shutil.copytree(root / "before/metrics", tmp_path / "metrics")
    out = build_report([B], ReportParams(), root=tmp_path)
    assert "by_split" not in out and "By split" not in (tmp_path / REPORT_MD).read_text()
    with open(tmp_path / REPORT_AP_BY_SPLIT_CSV, newline="") as f:
        assert [(r["backbone"], r["split"]) for r in csv.DictReader(f)] == [(B, "val")]


def test_official_coco_annotations_as_a_test_split(fixtures_dir, tmp_path):
    """Real COCO photos through build_index with val2017 indexed a second time as a test split: the split scores
    exactly as val does (same predictions, same stats) and as pycocotools does on the index's ground truth."""
    from mitdet.data.build_index import build_index
    from mitdet.models import build_detector, save_inference_model
    from mitdet.params import IndexParams

    tiny = fixtures_dir / "coco2017-tiny50"
    val = {"images": str(tiny / "val2017"), "annotations": str(tiny / "annotations/instances_val2017.json")}
    splits = {"train": {"images": str(tiny / "train2017"),
                        "annotations": str(tiny / "annotations/instances_train2017.json")}, "val": val, "official": val}
    write_json(tmp_path / "data/raw/manifest.json", {"source": "local", "splits": splits, "tests": ["official"]})
    build_index("data/raw/manifest.json", IndexParams(workers=1), tmp_path / "data/index", root=tmp_path)
    categories = read_json(tmp_path / "data/index/categories.json")
    torch.manual_seed(0)
    params = dataclasses.replace(tiny_model(96), max_size=128, roi=RoiParams(score_thresh=0.0, detections_per_img=30))
    save_inference_model(build_detector(B, len(categories) + 1, params), {
        "backbone": B, "num_classes": len(categories) + 1, "categories": categories, "model": to_dict(params)},
        tmp_path / BP.model_dir)
    metrics = evaluate(tmp_path)
    official = metrics["tests"]["official"]
    assert official["num_images"] == metrics["num_images"] == 50
    assert (tmp_path / BP.test_predictions("official")).read_bytes() == (tmp_path / BP.predictions).read_bytes()
    assert {k: official[k] for k in STAT_ORDER} == {k: metrics[k] for k in STAT_ORDER}
    assert official["per_class"] == read_json(tmp_path / BP.per_class_metrics)
    assert_stats(official, pycocotools_stats(tmp_path / "data/index/instances_official.json",
                                             tmp_path / BP.test_predictions("official")))
