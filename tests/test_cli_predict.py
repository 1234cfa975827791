"""`mitdet predict`: the evaluate stage's predictions for arbitrary files, one COCO-format JSON, drawings, skips."""
from __future__ import annotations

import json
import shutil

import cv2
import pytest

from tests.cli_fixtures import evaluate_path_results, run_cli, train_tiny_model, write_image_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("trained"))


def _by_file(doc: dict) -> dict[str, list[dict]]:
    """file_name -> its detections without ids (what to compare across two numberings of the images)."""
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    out: dict[str, list[dict]] = {n: [] for n in names.values()}
    for a in doc["annotations"]:
        out[names[a["image_id"]]].append({k: a[k] for k in ("category_id", "bbox", "score")})
    return out


def _reference_by_file(model_dir, files, names, batch_size):
    """The evaluate path's detections (the model's own score threshold) by file name."""
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in evaluate_path_results(model_dir, files, batch_size):
        out[names[r["image_id"] - 1]].append({k: r[k] for k in ("category_id", "bbox", "score")})
    return out


def _predict(capsys, model_dir, folder, out, *extra):
    return run_cli(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--workers", "0",
                    "--batch-size", "3", *extra], capsys)


def test_predict_equals_the_evaluate_path_and_lists_the_broken_file(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    paths = write_image_folder(folder)
    code, out, err = _predict(capsys, model_dir, folder, tmp_path / "p.json")
    assert code == 1  # a file was skipped
    assert f"skipped {paths['broken']}: truncated image file" in err
    assert "left alone 1 file(s)" in out  # notes.txt: not an image by its name, not counted as skipped
    doc = json.loads((tmp_path / "p.json").read_text())
    names = ["gen_0.jpg", "gen_1.jpg", "gen_2.jpg", "gray.jpg", "sub/nested.png"]
    assert [im["file_name"] for im in doc["images"]] == names
    assert [im["id"] for im in doc["images"]] == [1, 2, 3, 4, 5]
    assert doc["images"][3]["width"] == 110 and doc["images"][3]["height"] == 70  # the grayscale one, predicted
    assert doc["skipped"] == [{"path": str(paths["broken"]), "reason": "truncated image file"}]
    assert doc["info"]["score_threshold"] == 0.05 and doc["info"]["backbone"] == "mit_b0"  # the model's own
    assert {c["id"] for c in doc["categories"]} == {3, 7}
    assert len(doc["annotations"]) >= 5, "the model trained a few steps finds something"
    for a in doc["annotations"]:
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01) and a["iscrowd"] == 0
    assert _by_file(doc) == _reference_by_file(model_dir, [folder / n for n in names], names, batch_size=3)


def test_predict_on_real_photos_draws_each_one_legibly(model_dir, tmp_path, capsys, fixtures_dir):
    folder = tmp_path / "photos"
    write_image_folder(folder, real_photos=fixtures_dir / "coco2017-tiny50" / "val2017", broken=False)
    code, out, err = _predict(capsys, model_dir, folder, tmp_path / "p.json", "--draw", str(tmp_path / "drawn"),
                              "--draw-score", "0.05")
    assert code == 0, err  # nothing skipped
    doc = json.loads((tmp_path / "p.json").read_text())
    real = [im for im in doc["images"] if im["file_name"].startswith("0000")]
    assert len(real) == 4 and all(im["width"] >= 300 for im in real)
    files = [folder / im["file_name"] for im in doc["images"]]
    assert _by_file(doc) == _reference_by_file(model_dir, files, [im["file_name"] for im in doc["images"]], 3)
    for im in doc["images"]:
        name = im["file_name"] if im["file_name"].endswith(".jpg") else im["file_name"] + ".jpg"
        drawing = cv2.imread(str(tmp_path / "drawn" / name))
        assert drawing is not None, name
        # small images are enlarged and large ones reduced, so labels stay readable (drawing.draw_sample)
        assert min(drawing.shape[:2]) >= 300 and max(drawing.shape[:2]) <= 1100
    assert f"drew {len(doc['images'])} images" in out


def test_score_option_filters_like_the_models_own_threshold(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    write_image_folder(folder, broken=False)
    _predict(capsys, model_dir, folder, tmp_path / "low.json", "--score", "0.01")
    code, out, _ = _predict(capsys, model_dir, folder, tmp_path / "default.json")
    assert code == 0 and "score >= 0.05" in out  # tiny_model's roi.score_thresh
    _predict(capsys, model_dir, folder, tmp_path / "high.json", "--score", "0.1")
    high_thr = 0.1
    low, default, high = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("low", "default", "high"))
    assert default["info"]["score_threshold"] == 0.05
    for doc, thr in ((default, 0.05), (high, high_thr)):
        kept = {n: [d for d in dets if d["score"] >= thr] for n, dets in _by_file(low).items()}
        assert _by_file(doc) == kept
    # a barely trained model may fill its detections-per-image cap at every threshold: the lists nest, and each
    # equals the low list filtered at its threshold (above)
    assert len(low["annotations"]) >= len(default["annotations"]) >= len(high["annotations"]) > 0


def test_output_loads_in_pycocotools_and_scores_against_a_ground_truth(model_dir, tmp_path, capsys):
    from pycocotools.coco import COCO

    folder = tmp_path / "images"
    write_image_folder(folder, broken=False)
    _predict(capsys, model_dir, folder, tmp_path / "p.json", "--score", "0.01")
    coco = COCO(str(tmp_path / "p.json"))
    assert len(coco.imgs) == 5 and len(coco.anns) == len(json.loads((tmp_path / "p.json").read_text())["annotations"])
    # a ground truth numbering the same files differently: score maps them by file_name
    doc = json.loads((tmp_path / "p.json").read_text())
    gt = {"images": [{**im, "id": 100 + im["id"]} for im in doc["images"]], "categories": doc["categories"],
          "annotations": [{"id": a["id"], "image_id": 100 + a["image_id"], "category_id": a["category_id"],
                           "bbox": a["bbox"], "area": a["area"], "iscrowd": 0} for a in doc["annotations"]]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    code, out, _ = run_cli(["score", str(tmp_path / "gt.json"), str(tmp_path / "p.json")], capsys)
    assert code == 0
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out


def test_files_named_twice_and_clashing_names(model_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_image_folder(a, broken=False)
    b.mkdir()
    shutil.copy(a / "gen_1.jpg", b / "gen_1.jpg")
    code, _, _ = run_cli(["predict", "--model", str(model_dir), str(a), str(a / "gen_0.jpg"), str(b), "--out",
                          str(tmp_path / "p.json"), "--workers", "0"], capsys)
    assert code == 0
    names = [im["file_name"] for im in json.loads((tmp_path / "p.json").read_text())["images"]]
    assert len(names) == 6 and len(set(names)) == 6  # gen_0.jpg once; the two gen_1.jpg told apart by path
    assert (a / "gen_1.jpg").as_posix() in names and (b / "gen_1.jpg").as_posix() in names


def test_nothing_to_predict_and_a_missing_model_are_one_error_line(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["predict", "--model", str(model_dir), str(tmp_path / "empty"), "--out",
                            str(tmp_path / "p.json")], capsys)
    assert code == 1 and err.startswith("error: ") and "no image to predict" in err and err.count("\n") == 1
    code, _, err = run_cli(["predict", "--model", str(tmp_path / "nope"), str(tmp_path)], capsys)
    assert code == 1 and err.startswith("error: ") and "no saved model here" in err
    code, _, err = run_cli(["predict", "--model", str(model_dir), str(tmp_path), "--score", "2"], capsys)
    assert code == 2 and "not in [0, 1]" in err


def test_an_absent_device_is_a_usage_error(model_dir, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["predict", "--model", str(model_dir), str(tmp_path), "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: --device: ") and "no CUDA GPU" in err
