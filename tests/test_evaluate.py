"""Inference over a split: boxes back in original pixels, scoring what was predicted, the stage's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mitdet.drawing import draw_sample
from mitdet.engine.device import backbone_autocast
from mitdet.engine.evaluate import EVAL_KEYS, SCORE_KEYS, images_left_out_by_index
from mitdet.engine.inference import measure_speed, predict, to_coco_results
from mitdet.engine.scoring import score

LABEL_TO_CATEGORY = {1: 3, 2: 7}  # contiguous labels -> original COCO ids


class ScriptedDetector(nn.Module):
    """Returns, for each input image, the boxes stored for it (in that input's pixels), found by a pixel tag."""

    def __init__(self, outputs_by_tag: dict[int, dict]):
        super().__init__()
        self.outputs = outputs_by_tag
        self.seen_shapes = []

    def forward(self, images):
        out = []
        for im in images:
            self.seen_shapes.append(tuple(im.shape))
            out.append(self.outputs[int(round(float(im[0, 0, 0]) * 255))])
        return out


def tagged_image(tag: int, h: int, w: int) -> torch.Tensor:
    im = torch.zeros(3, h, w)
    im[0, 0, 0] = tag / 255.0
    return im


def detections(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_predict_maps_boxes_back_to_original_pixels():
    # image 5: 200x300 file shown to the model at scale 0.5 (100x150); image 6: 90x120 at 1.5 with a rounded side
    model = ScriptedDetector({
        1: detections([[10, 20, 50, 60], [140, 90, 170, 120]], [1, 2], [0.9, 0.4]),  # the 2nd runs off the image
        2: detections([[0, 0, 182, 135]], [2], [0.75]),
    })
    loader = [
        ([tagged_image(1, 100, 150)], [{"image_id": 5, "orig_size": (200, 300), "scale": 0.5}], 0),
        ([], [], 1),  # a batch whose only image failed to decode
        ([tagged_image(2, 135, 182)], [{"image_id": 6, "orig_size": (90, 121), "scale": 1.5}], 0),
    ]
    results, stats = predict(model, loader, "cpu", LABEL_TO_CATEGORY, progress=False)
    assert stats["images"] == 2 and stats["skipped"] == 1 and stats["image_ids"] == [5, 6]
    assert results[0] == {"image_id": 5, "category_id": 3, "bbox": [20.0, 40.0, 80.0, 80.0], "score": 0.9}
    # (280, 180, 340, 240) clipped to the 300 x 200 image
    assert results[1] == {"image_id": 5, "category_id": 7, "bbox": [280.0, 180.0, 20.0, 20.0], "score": 0.4}
    # 121 px wide shown as 182 px (181.5 rounded): the per-axis ratio maps the full width back to exactly 121
    x, y, w, h = results[2]["bbox"]
    assert (x, y, h) == (0.0, 0.0, 90.0) and w == pytest.approx(121.0)
    assert results[2]["category_id"] == 7


def test_predicted_ground_truth_scores_one_through_the_whole_mapping():
    """GT boxes, drawn in each resized input, predicted and mapped back, must score AP 1 against the GT file."""
    rng = np.random.default_rng(0)
    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    outputs, loader = {}, []
    for tag, image_id in enumerate((11, 22, 33), start=1):
        h, w = int(rng.integers(80, 200)), int(rng.integers(80, 200))
        scale = 64 / min(h, w)
        ih, iw = round(h * scale), round(w * scale)
        gt["images"].append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.jpg"})
        boxes, labels = [], []
        for _ in range(3):
            x0, y0 = rng.uniform(0, w - 30), rng.uniform(0, h - 30)
            bw, bh = rng.uniform(10, w - x0), rng.uniform(10, h - y0)
            label = int(rng.integers(1, 3))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "bbox": [x0, y0, bw, bh],
                                      "category_id": LABEL_TO_CATEGORY[label], "area": bw * bh, "iscrowd": 0})
            boxes.append([x0 * iw / w, y0 * ih / h, (x0 + bw) * iw / w, (y0 + bh) * ih / h])
            labels.append(label)
        outputs[tag] = detections(boxes, labels, [0.9] * 3)
        loader.append(([tagged_image(tag, ih, iw)], [{"image_id": image_id, "orig_size": (h, w), "scale": scale}], 0))
    results, stats = predict(ScriptedDetector(outputs), loader, "cpu", LABEL_TO_CATEGORY, progress=False)
    s = score(gt, results, image_ids=stats["image_ids"])
    assert s.summary["AP"] == pytest.approx(1.0)
    # and a detector off by the resize factor (boxes left in resized pixels) would not
    wrong = [dict(r, bbox=[v * 0.5 for v in r["bbox"]]) for r in results]
    assert score(gt, wrong).summary["AP"] < 0.5


def test_unmapped_label_fails_clearly():
    model = ScriptedDetector({1: detections([[0, 0, 5, 5]], [9], [0.5])})
    loader = [([tagged_image(1, 10, 10)], [{"image_id": 1, "orig_size": (10, 10), "scale": 1.0}], 0)]
    with pytest.raises(ValueError, match="label 9"):
        predict(model, loader, "cpu", LABEL_TO_CATEGORY, progress=False)


def test_empty_output_gives_no_results():
    out = detections([], [], [])
    assert to_coco_results(out, {"image_id": 1, "orig_size": (10, 10), "scale": 1.0}, (10, 10), LABEL_TO_CATEGORY) == []


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)

    def forward(self, images):
        return [self.backbone(im[None]) for im in images]


def test_measure_speed():
    model = TinyDetector()
    speed = measure_speed(model, [torch.rand(3, 16, 16)], "cpu", warmup=1, iters=3)
    assert speed["images_per_s"] > 0 and speed["ms_per_image"] == pytest.approx(1000.0 / speed["images_per_s"])
    assert measure_speed(model, [], "cpu", 1, 3) == {"images_per_s": None, "ms_per_image": None}


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_backbone_autocast_wraps_only_the_backbone_and_restores_it():
    model = TinyDetector()
    with backbone_autocast(model, torch.device("cpu"), "bf16"):
        assert "forward" not in model.backbone.__dict__  # no half precision on the CPU
    with backbone_autocast(model, torch.device("cuda"), "bf16"):  # patched (not run on a GPU here)
        assert "forward" in model.backbone.__dict__
        assert model([torch.rand(3, 8, 8)])[0].dtype == torch.float32  # the heads get float32 features
        patched = model.backbone.forward
        with backbone_autocast(model, torch.device("cuda"), "bf16"):  # validation inside training
            assert model.backbone.forward is patched
        assert model.backbone.forward is patched  # the inner one left the outer patch in place
    assert "forward" not in model.backbone.__dict__


def test_images_left_out_by_index_counts_the_splits_image_rows_of_rejected_csv(tmp_path):
    path = tmp_path / "rejected.csv"
    assert images_left_out_by_index(path) is None  # no rejected.csv: nothing to say
    path.write_text("split,file,image_id,ann_id,reason\n"
                    "val,a.jpg,1,,unreadable_image\n"
                    "val,a.jpg,1,11,image_rejected\n"       # a box of that image: not another image
                    "val,b.jpg,2,12,box_too_small\n"
                    "val,,,,malformed_image_entry\n"
                    "train,c.jpg,3,,unreadable_image\n")
    assert images_left_out_by_index(path, "val") == 2 and images_left_out_by_index(path, "train") == 1
    path.write_text("split,file,image_id,ann_id,reason\n")
    assert images_left_out_by_index(path, "val") == 0


def test_draw_sample_enlarges_small_images_for_readable_labels():
    img = np.full((100, 150, 3), 128, np.uint8)
    out = draw_sample(img, [([10, 10, 60, 60], "cat", False), ([70, 20, 140, 90], "dog", True)],
                      [([12, 8, 58, 62], "cat", 0.87)])
    assert out.shape[1] == 720 and out.shape[0] > 480  # 3.2x, plus the legend strip
    assert (out != 128).any()


# ------------------------------------------------------------------------------ the stage, end to end
def write_coco_split(root, split: str, sizes, rng, crowd_on=None, broken=None):
    """Real JPEGs of the given (h, w) sizes with 1-2 shapes each; COCO JSON with ids 3 (square), 7 (disc)."""
    import cv2
    images_dir = root / "raw" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [
        {"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 9, "name": "never"}]}
    for n, (h, w) in enumerate(sizes):
        image_id = 100 * (split == "val") + n + 1
        img = (rng.random((h, w, 3)) * 60 + 40).astype(np.uint8)
        for k in range(1 + n % 2):
            side = int(min(h, w) * 0.4)
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            cat = (3, 7)[(n + k) % 2]
            cv2.rectangle(img, (x, y), (x + side - 1, y + side - 1), (40, 40, 230) if cat == 3 else (230, 200, 40), -1)
            coco["annotations"].append({"id": 1000 * image_id + k, "image_id": image_id, "category_id": cat,
                                        "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
        if n == crowd_on:
            coco["annotations"].append({"id": 1000 * image_id + 9, "image_id": image_id, "category_id": 3,
                                        "bbox": [0, 0, w / 3, h / 3], "area": w * h / 9, "iscrowd": 1})
        name = f"{image_id}.jpg"
        if n == broken:
            (images_dir / name).write_bytes(b"not a jpeg")
        else:
            cv2.imwrite(str(images_dir / name), img)
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
    ann = root / "raw" / f"instances_{split}.json"
    ann.write_text(json.dumps(coco))
    return {"images": str(images_dir), "annotations": str(ann)}


@pytest.fixture
def evaluated_project(tmp_path, capsys):
    from mitdet.data.build_index import build_index
    from mitdet.io import write_json
    from mitdet.models import build_detector, save_inference_model
    from mitdet.params import EvaluateParams, IndexParams, ModelParams, RoiParams, RpnParams, to_dict
    from mitdet.engine.evaluate import evaluate_backbone

    rng = np.random.default_rng(0)
    splits = {"train": write_coco_split(tmp_path, "train", [(60, 80)] * 2, rng),
              "val": write_coco_split(tmp_path, "val", [(60, 80), (90, 70), (64, 64), (50, 100), (70, 70)], rng,
                                      crowd_on=1, broken=4)}
    write_json(tmp_path / "data/raw/manifest.json", {"source": "local", "splits": splits})
    build_index("data/raw/manifest.json", IndexParams(workers=1), tmp_path / "data/index",
                metrics_path=tmp_path / "metrics/index.json", root=tmp_path)

    torch.manual_seed(0)
    # score_thresh 0: an untrained model still returns its top detections, so every scoring path runs
    model_params = ModelParams(fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128], min_size=48, max_size=80,
                               rpn=RpnParams(pre_nms_top_n_test=50, post_nms_top_n_test=30),
                               roi=RoiParams(score_thresh=0.0, detections_per_img=15))
    categories = [{"id": 3, "name": "square", "label": 1}, {"id": 7, "name": "disc", "label": 2},
                  {"id": 9, "name": "never", "label": 3}]
    model = build_detector("mit_b0", 4, model_params)
    save_inference_model(model, {"backbone": "mit_b0", "num_classes": 4, "categories": categories,
                                 "model": to_dict(model_params)}, tmp_path / "models/mit_b0")
    params = EvaluateParams(batch_size=2, scorer="faster_coco_eval", samples=2, sample_score_thresh=0.0,
                            speed_images=2, speed_warmup=1, device="cpu", amp="auto", num_workers=0)
    metrics = evaluate_backbone("mit_b0", params, root=tmp_path, progress=False)
    return tmp_path, metrics, capsys.readouterr().out


def test_evaluate_backbone_end_to_end(evaluated_project):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from mitdet.io import read_json

    root, metrics, printed = evaluated_project
    eval_json = read_json(root / "metrics/mit_b0/eval.json")
    assert eval_json == metrics
    assert list(eval_json) == [*EVAL_KEYS, "images_skipped", "images_left_out_by_index", "machine"]
    assert eval_json["machine"]["threads"] >= 1 and "load_average" in eval_json["machine"]  # beside the speed
    assert eval_json["num_images"] == 4 and eval_json["images_left_out_by_index"] == 1  # the broken file
    assert eval_json["images_skipped"] == 0
    assert eval_json["params_m"] > 1 and eval_json["gflops"] > 0 and eval_json["ms_per_image"] > 0

    # the predictions file is plain COCO results in original pixels; pycocotools on it gives eval.json's numbers
    preds = read_json(root / "data/predictions/mit_b0.json")
    gt = read_json(root / "data/index/instances_val.json")
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    assert preds and {p["category_id"] for p in preds} <= {3, 7, 9}
    assert all(p["bbox"][0] + p["bbox"][2] <= sizes[p["image_id"]][0] + 0.01 and
               p["bbox"][1] + p["bbox"][3] <= sizes[p["image_id"]][1] + 0.01 for p in preds)
    coco_gt = COCO(str(root / "data/index/instances_val.json"))
    ev = COCOeval(coco_gt, coco_gt.loadRes(str(root / "data/predictions/mit_b0.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")):
        assert (eval_json[key] is None) if ev.stats[i] == -1 else eval_json[key] == pytest.approx(ev.stats[i], abs=1e-6)

    per_class = read_json(root / "metrics/mit_b0/per_class.json")
    assert set(per_class) == {"square", "disc", "never"}
    assert per_class["never"]["AP"] is None and per_class["never"]["num_gt"] == 0
    assert per_class["square"]["num_gt"] + per_class["disc"]["num_gt"] == 6  # crowd region not counted

    per_class_csv = (root / "plots/mit_b0/per_class_ap.csv").read_text().splitlines()
    assert per_class_csv[0] == "class,AP,AP50" and len(per_class_csv) == 3
    pr = (root / "plots/mit_b0/pr_curve.csv").read_text().splitlines()
    assert pr[0] == "recall,precision_iou50,precision_iou75" and len(pr) == 1 + 101
    samples = sorted((root / "plots/mit_b0/samples").glob("*.jpg"))
    assert len(samples) == 2 and all(s.stat().st_size < 200_000 for s in samples)
    assert "TOP PERFORMING CLASSES" in printed and "CLASSES NEEDING ATTENTION" in printed


def test_without_test_splits_no_tests_key_and_empty_split_folders(evaluated_project):
    from mitdet.io import read_json
    from mitdet.paths import BackbonePaths

    root, metrics, printed = evaluated_project
    bp = BackbonePaths("mit_b0")
    assert "tests" not in metrics and "tests" not in read_json(root / bp.scores)["mit_b0"]
    assert list(read_json(root / bp.scores)["mit_b0"]) == list(SCORE_KEYS)
    assert not any((root / bp.test_predictions_dir).iterdir()) and not any((root / bp.test_per_class_ap_dir).iterdir())
    assert "TEST SPLIT" not in printed
