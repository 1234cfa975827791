"""The yolo source: YOLO-format folders (.npy arrays or ordinary images + label files) through prepare and build_index."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mitdet.data.build_index import build_index
from mitdet.data.index import load_split, test_splits
from mitdet.data.sources import prepare
from mitdet.errors import DataError
from mitdet.params import IndexParams, YoloParams, YoloSplit, load_params

ROOT = Path(__file__).resolve().parents[1]
ANN = "data/raw/yolo/annotations"
RGB_KEYS = ["image_id", "file", "width", "height", "boxes", "category_ids", "labels", "iscrowd", "ann_ids"]
GOOD = "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.2 0.1\n"
BAD_LINES = {  # line -> the reason it is skipped with
    "0 0.5 0.5 0.5": "wrong_field_count", "0 0.5 zero 0.1 0.1": "not_a_number", "1 nan 0.5 0.1 0.1": "not_a_number",
    "2 0.5 0.5 0.1 0.1": "unknown_class", "-1 0.5 0.5 0.1 0.1": "unknown_class", "0.5 0.5 0.5 0.1 0.1": "unknown_class",
    "0 0.95 0.5 0.3 0.1": "outside_image", "0 0.5 0.5 0 0.1": "zero_size", "1 0.25 0.25 0.2 0.1": "duplicate_line",
}


def _data(yolo: YoloParams):
    return dataclasses.replace(load_params(ROOT / "params.yaml").data, source="yolo", yolo=yolo)


def _npy(path: Path, h: int, w: int, c: int = 5, dtype=np.uint8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, 255, (h, w, c)).astype(dtype))


def _npy_folder(root: Path, name: str, n: int) -> YoloSplit:
    """`n` good (H, W, 5) arrays, each with two boxes, under root/name/{images,labels}."""
    for i in range(n):
        _npy(root / name / "images" / f"{i:03d}.npy", 40 + i % 3, 60, seed=i)
        (root / name / "labels").mkdir(parents=True, exist_ok=True)
        (root / name / "labels" / f"{i:03d}.txt").write_text(GOOD)
    return YoloSplit(f"{name}/images", f"{name}/labels")


def _odd_cases(root: Path) -> None:
    """Negatives, malformed lines, unusable arrays and a label without an image, added to root/train."""
    img, lab = root / "train" / "images", root / "train" / "labels"
    for stem in ("neg_nolabel1", "neg_nolabel2", "neg_empty", "bad_lines", "all_bad"):
        _npy(img / f"{stem}.npy", 40, 60)
    (lab / "neg_empty.txt").write_text("\n  \n")
    (lab / "bad_lines.txt").write_text(GOOD + "".join(line + "\n" for line in BAD_LINES))
    (lab / "all_bad.txt").write_text("0 1 2\n")
    _npy(img / "float.npy", 40, 60, dtype=np.float32)
    _npy(img / "two_channels.npy", 40, 60, c=2)
    whole = (img / "000.npy").read_bytes()
    (img / "cut.npy").write_bytes(whole[:-100])
    for stem in ("float", "two_channels", "cut"):
        (lab / f"{stem}.txt").write_text(GOOD)
    (lab / "orphan.txt").write_text(GOOD)
    (img / "notes.txt").write_text("not an image: ignored")


def _prepared(tmp_path: Path, negatives="keep", seed=0, **kw) -> dict:
    yolo = YoloParams(train=YoloSplit("train/images", "train/labels"), names=["car", "person"], negatives=negatives, **kw)
    return prepare(_data(yolo), seed=seed, root=tmp_path)


def _ids(tmp_path: Path, split: str) -> list[str]:
    return [im["file_name"] for im in json.loads((tmp_path / ANN / f"instances_{split}.json").read_text())["images"]]


def test_yolo_npy_folder_through_prepare_and_index(tmp_path):
    _npy_folder(tmp_path, "train", 20)
    _odd_cases(tmp_path)
    tests = {"day": _npy_folder(tmp_path, "day", 3), "night": _npy_folder(tmp_path, "night", 2)}
    manifest = _prepared(tmp_path, tests=tests)
    assert list(manifest["splits"]) == ["train", "val", "day", "night"] and manifest["tests"] == ["day", "night"]
    assert manifest["splits"]["val"] == {"images": "train/images", "annotations": f"{ANN}/instances_val.json"}
    conv = manifest["conversion"]
    both = {k: conv["train"][k] + conv["val"][k] for k in ("images", "images_kept", "lines", "lines_kept", "annotations")}
    assert both == {"images": 28, "images_kept": 24, "lines": 40 + 2 + len(BAD_LINES) + 1,
                    "lines_kept": 42, "annotations": 42}
    skipped = {r: conv["train"]["images_skipped"].get(r, 0) + conv["val"]["images_skipped"].get(r, 0)
               for r in ("unsupported_array", "channels_mismatch", "truncated", "all_lines_skipped")}
    assert skipped == {"unsupported_array": 1, "channels_mismatch": 1, "truncated": 1, "all_lines_skipped": 1}
    lines = {r: conv["train"]["lines_skipped"].get(r, 0) + conv["val"]["lines_skipped"].get(r, 0)
             for r in {*BAD_LINES.values(), "wrong_field_count"}}
    assert lines == {"wrong_field_count": 2, "not_a_number": 2, "unknown_class": 3, "outside_image": 1,
                     "zero_size": 1, "duplicate_line": 1}
    negatives = {k: conv["train"]["negatives"][k] + conv["val"]["negatives"][k] for k in conv["train"]["negatives"]}
    assert negatives == {"no_label_file": 2, "empty_label_file": 1, "kept": 3, "dropped": 0}
    assert conv["train"]["labels_without_image"] == 1 and conv["day"]["images_kept"] == 3

    # seeded split: 80/20 of the 28 image files, disjoint, reproducible byte for byte, another seed another split
    train, val = _ids(tmp_path, "train"), _ids(tmp_path, "val")
    assert conv["train"]["images"] == 22 and conv["val"]["images"] == 6 and not set(train) & set(val)
    first = {p.name: p.read_bytes() for p in (tmp_path / ANN).iterdir()}
    _prepared(tmp_path, tests=tests)
    assert {p.name: p.read_bytes() for p in (tmp_path / ANN).iterdir()} == first
    _prepared(tmp_path, seed=1, tests=tests)
    assert set(_ids(tmp_path, "val")) != set(val) and len(_ids(tmp_path, "val")) + len(_ids(tmp_path, "train")) == 24
    _prepared(tmp_path, tests=tests)

    # every skipped line and image has a row naming its file and reason
    rows = list(csv.DictReader(open(tmp_path / ANN / "skipped.csv")))
    bad = {r["text"]: r["reason"] for r in rows if r["file"] == "train/labels/bad_lines.txt"}
    assert bad == BAD_LINES and {r["line"] for r in rows if r["file"] == "train/labels/bad_lines.txt"} == {
        str(n) for n in range(3, 3 + len(BAD_LINES))}
    assert {(r["file"], r["reason"]) for r in rows if r["line"] == ""} == {
        ("train/images/float.npy", "unsupported_array"), ("train/images/two_channels.npy", "channels_mismatch"),
        ("train/images/cut.npy", "truncated"), ("train/images/all_bad.npy", "all_lines_skipped"),
        ("train/labels/orphan.txt", "label_without_image")}

    # build_index: the arrays' channels 3.. are the aux image; test splits indexed like val
    metrics = build_index("data/raw/manifest.json", IndexParams(aux_channels=2), tmp_path / "index", root=tmp_path)
    assert {s: m["images_kept"] for s, m in metrics["splits"].items()} == {
        "train": conv["train"]["images_kept"], "val": conv["val"]["images_kept"], "day": 3, "night": 2}
    assert all(m["images_rejected"] == {} for m in metrics["splits"].values())
    assert test_splits(tmp_path / "index") == ["day", "night"]
    day = load_split(tmp_path / "index", "day", root=tmp_path)
    assert day.aux_channels == 2 and all(r.aux == r.file and r.file.endswith(".npy") for r in day.images)
    rec = {Path(r.file).name: r for r in day.images}["000.npy"]
    np.testing.assert_allclose(rec.boxes, [[15, 10, 45, 30], [9, 8, 21, 12]])  # 60x40: the pixel boxes, xyxy
    assert rec.labels.tolist() == [1, 2] and rec.category_ids.tolist() == [1, 2]
    cats = json.loads((tmp_path / "index" / "categories.json").read_text())
    assert cats == [{"id": 1, "name": "car", "label": 1}, {"id": 2, "name": "person", "label": 2}]
    night_gt = json.loads((tmp_path / "index" / "instances_night.json").read_text())
    assert len(night_gt["images"]) == 2 and len(night_gt["annotations"]) == 4


def test_yolo_negatives_drop_counts_and_leaves_them_out(tmp_path):
    _npy_folder(tmp_path, "train", 6)
    _odd_cases(tmp_path)
    conv = _prepared(tmp_path, negatives="drop")["conversion"]
    negatives = {k: conv["train"]["negatives"][k] + conv["val"]["negatives"][k] for k in conv["train"]["negatives"]}
    assert negatives == {"no_label_file": 2, "empty_label_file": 1, "kept": 0, "dropped": 3}
    names = _ids(tmp_path, "train") + _ids(tmp_path, "val")
    assert len(names) == 6 + 1 and not any(n.startswith("neg_") for n in names)  # + bad_lines.npy
    # the split does not depend on `negatives`: an image's side is drawn among all image files
    kept_val = set(_ids(tmp_path, "val"))
    _prepared(tmp_path, negatives="keep")
    assert kept_val <= set(_ids(tmp_path, "val"))


def test_yolo_jpeg_folders_ultralytics_layout(tmp_path):
    """Ordinary 3-channel images (JPEG, PNG, a subfolder), a given val folder: the Ultralytics case, RGB index."""
    rng = np.random.default_rng(0)
    for split, names in (("train", ["a.jpg", "b.png", "sub/c.jpeg", "d.jpg", "d.png"]), ("val", ["v.jpg"])):
        for name in names:
            (tmp_path / split / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / split / "images" / name), rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
            label = tmp_path / split / "labels" / Path(name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "train" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    yolo = YoloParams(train=YoloSplit("train/images", "train/labels"), val=YoloSplit("val/images", "val/labels"),
                      names=["thing"])
    manifest = prepare(_data(yolo), seed=0, root=tmp_path)
    assert manifest["tests"] == [] and "aux" not in manifest["splits"]["train"]
    conv = manifest["conversion"]["train"]
    assert conv["images"] == 6 and conv["images_kept"] == 3
    assert conv["images_skipped"] == {"shared_stem": 2, "truncated": 1}  # d.jpg and d.png share d.txt
    gt = json.loads((tmp_path / ANN / "instances_train.json").read_text())
    assert [im["file_name"] for im in gt["images"]] == ["a.jpg", "b.png", "sub/c.jpeg"]
    assert gt["annotations"][0]["bbox"] == [25.0, 20.0, 50.0, 40.0] and gt["annotations"][0]["category_id"] == 1
    assert gt["categories"] == [{"id": 1, "name": "thing"}]

    build_index("data/raw/manifest.json", IndexParams(), tmp_path / "index", root=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "index" / "train.jsonl").read_text().splitlines()]
    assert [list(r) for r in lines] == [RGB_KEYS] * 3  # no aux key with index.aux_channels 0
    assert lines[2]["file"] == "train/images/sub/c.jpeg" and lines[2]["boxes"] == [[25.0, 20.0, 50.0, 40.0]]
    assert json.loads((tmp_path / "index" / "layout.json").read_text()) == {"tests": [], "aux_channels": 0}
    assert len(load_split(tmp_path / "index", "val").images) == 1


@pytest.mark.parametrize("missing", ["labels", "images", "aux"])
def test_yolo_missing_folder_names_the_key(tmp_path, missing):
    _npy_folder(tmp_path, "train", 2)
    split = dataclasses.replace(YoloSplit("train/images", "train/labels", aux="train/aux"),
                                **{missing: "nowhere"})
    if missing != "aux":
        (tmp_path / "train" / "aux").mkdir()
    with pytest.raises(DataError, match=rf"data\.yolo\.train\.{missing} = .*nowhere: not found.*set it in params"):
        prepare(_data(YoloParams(train=split, names=["car", "person"])), seed=0, root=tmp_path)
