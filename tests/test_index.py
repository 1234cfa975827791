"""build_index and the header reader on real JPEG/PNG files, bad files and bad boxes, and the shared fixtures."""
from __future__ import annotations

import csv
import dataclasses
import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mitdet.data.headers import probe
from mitdet.data.build_index import build_index
from mitdet.data.index import check_coco, load_split
from mitdet.data.sources import prepare
from mitdet.errors import DataError
from mitdet.params import IndexParams, LocalParams, SplitPaths, load_params

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def _img(h, w, gray=False, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w) if gray else (h, w, 3), dtype=np.uint8)


def _with_big_app1(jpeg: bytes, n: int = 5000) -> bytes:
    """Insert an APP1 segment of n bytes right after SOI, pushing SOF past the first read."""
    seg = b"\xff\xe1" + struct.pack(">H", n + 2) + b"Exif\0\0" + bytes(n - 6)
    return jpeg[:2] + seg + jpeg[2:]


def test_probe_reads_real_headers(tmp_path):
    cases = {
        "rgb.jpg": cv2.imencode(".jpg", _img(37, 53))[1].tobytes(),
        "gray.jpg": cv2.imencode(".jpg", _img(41, 29, gray=True))[1].tobytes(),
        "progressive.jpg": cv2.imencode(".jpg", _img(60, 70), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        "exif.jpg": _with_big_app1(cv2.imencode(".jpg", _img(33, 47))[1].tobytes()),
        "rgb.png": cv2.imencode(".png", _img(31, 65))[1].tobytes(),
        "gray16.png": cv2.imencode(".png", (_img(22, 19, gray=True).astype(np.uint16) * 200))[1].tobytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        decoded = cv2.imread(str(tmp_path / name), cv2.IMREAD_UNCHANGED)
        assert probe(str(tmp_path / name)) == (decoded.shape[1], decoded.shape[0], ""), name
    good = cases["rgb.jpg"]
    bad = {"empty.jpg": b"", "text.jpg": b"hello, not an image\n", "head_only.jpg": good[:40],
           "no_eoi.jpg": good[:-100], "png_cut.png": cases["rgb.png"][:-30]}
    expected = {"empty.jpg": "empty_file", "text.jpg": "not_an_image", "head_only.jpg": "truncated",
                "no_eoi.jpg": "truncated", "png_cut.png": "truncated"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        assert probe(str(tmp_path / name))[2] == expected[name], name
    assert probe(str(tmp_path / "absent.jpg"))[2] == "missing_file"
    assert probe(str(tmp_path))[2] == "not_a_regular_file"  # a directory


def _dataset(tmp_path: Path):
    """A COCO folder with good, bad and odd images and annotations; returns the manifest path."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    good = {1: ("a.jpg", _img(60, 80)), 2: ("b.png", _img(50, 40)), 3: ("c.jpg", _img(45, 45, gray=True))}
    for _, (name, px) in good.items():
        cv2.imwrite(str(img_dir / name), px)
    jpeg = cv2.imencode(".jpg", _img(30, 30))[1].tobytes()
    (img_dir / "empty.jpg").write_bytes(b"")
    (img_dir / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img_dir / "text.jpg").write_text("not an image")
    cv2.imwrite(str(img_dir / "wrongsize.jpg"), _img(20, 20))
    images = [{"id": i, "file_name": n, "width": px.shape[1], "height": px.shape[0]} for i, (n, px) in good.items()]
    images += [{"id": 10, "file_name": "missing.jpg", "width": 30, "height": 30},
               {"id": 11, "file_name": "empty.jpg", "width": 30, "height": 30},
               {"id": 12, "file_name": "trunc.jpg", "width": 30, "height": 30},
               {"id": 13, "file_name": "text.jpg", "width": 30, "height": 30},
               {"id": 14, "file_name": "wrongsize.jpg", "width": 30, "height": 30},
               {"id": 15, "file_name": 7, "width": 30, "height": 30},
               {"id": 1, "file_name": "a.jpg", "width": 80, "height": 60}]
    anns = [
        {"id": 100, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "iscrowd": 0, "area": 400},
        {"id": 101, "image_id": 1, "category_id": 2, "bbox": [70, 50, 30, 30], "iscrowd": 0},   # clipped to 10x10
        {"id": 102, "image_id": 1, "category_id": 5, "bbox": [0, 0, 40, 40], "iscrowd": 1},     # crowd: eval only
        {"id": 103, "image_id": 1, "category_id": 5, "bbox": [100, 100, 10, 10], "iscrowd": 0}, # outside
        {"id": 104, "image_id": 1, "category_id": 5, "bbox": [5, 5, 1, 30], "iscrowd": 0},      # too narrow
        {"id": 105, "image_id": 1, "category_id": 99, "bbox": [5, 5, 10, 10], "iscrowd": 0},    # unknown category
        {"id": 106, "image_id": 999, "category_id": 5, "bbox": [5, 5, 10, 10], "iscrowd": 0},   # unknown image
        {"id": 107, "image_id": 2, "category_id": 5, "bbox": ["x", 5, 10, 10], "iscrowd": 0},   # malformed
        {"id": 108, "image_id": 2, "category_id": 5, "bbox": [5, 5, -3, 10], "iscrowd": 0},     # degenerate
        {"id": 100, "image_id": 2, "category_id": 5, "bbox": [5, 5, 10, 10], "iscrowd": 0},     # duplicate id
        {"id": 109, "image_id": 3, "category_id": 2, "bbox": [1.5, 2.5, 30, 20], "iscrowd": 0},
        {"id": 110, "image_id": 12, "category_id": 2, "bbox": [1, 1, 5, 5], "iscrowd": 0},      # its image is rejected
        {"id": 111, "image_id": 15, "category_id": 2, "bbox": [1, 1, 5, 5], "iscrowd": 0},      # its entry is malformed
        "not an annotation",                                                                     # malformed, no id
    ]
    cats = [{"id": 5, "name": "dog"}, {"id": 2, "name": "bicycle"}]
    (tmp_path / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    val = {"images": images[:1], "annotations": anns[:1], "categories": cats}
    (tmp_path / "val.json").write_text(json.dumps(val))
    manifest = {"source": "local", "splits": {s: {"images": str(img_dir), "annotations": str(tmp_path / f"{s}.json")}
                                              for s in ("train", "val")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


@pytest.mark.parametrize("workers", [1, 2])
def test_build_index_counts_and_skips_bad_input(tmp_path, workers, monkeypatch):
    import mitdet.data.build_index as index_mod
    monkeypatch.setattr(index_mod, "INLINE_BELOW", 0)  # exercise the process pool on a small set
    manifest = _dataset(tmp_path)
    out = tmp_path / "index"
    metrics = build_index(manifest, IndexParams(min_box_size=2.0, workers=workers), out, tmp_path / "metrics.json")
    m = metrics["splits"]["train"]
    assert m["images"] == 10 and m["images_kept"] == 3
    assert m["images_rejected"] == {"duplicate_image_id": 1, "empty_file": 1, "malformed_image_entry": 1,
                                    "missing_file": 1, "not_an_image": 1, "size_mismatch": 1, "truncated": 1}
    assert m["annotations_rejected"] == {"box_outside_image": 1, "box_too_small": 1, "degenerate_box": 1,
                                         "image_rejected": 2, "malformed_annotation": 2,
                                         "unknown_category": 1, "unknown_image": 1}
    # id 100 twice with two different boxes: both kept (the ground truth renumbers), counted and warned about
    assert m["annotations_kept"] == 5 and m["crowd_kept"] == 1 and m["boxes_clipped"] == 1
    assert m["annotation_ids_shared"] == 1 and m["gt_annotations"] == 6  # + the too-small box 104
    assert any("reuse another annotation's id" in w for w in metrics["warnings"])
    assert m["annotations"] == 14 == m["annotations_kept"] + sum(m["annotations_rejected"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["splits"]["train"]["images_per_s"] > 0

    # categories: sorted by id, contiguous labels, names kept
    assert json.loads((out / "categories.json").read_text()) == [
        {"id": 2, "name": "bicycle", "label": 1}, {"id": 5, "name": "dog", "label": 2}]
    # JSON Lines readable by pandas; boxes clipped; crowd flagged
    df = pd.read_json(out / "train.jsonl", lines=True)
    assert sorted(df["image_id"]) == [1, 2, 3]
    row = df.set_index("image_id").loc[1]
    assert row["ann_ids"] == [100, 101, 102] and row["iscrowd"] == [0, 0, 1] and row["labels"] == [2, 1, 2]
    assert row["boxes"][1] == [70, 50, 10, 10]
    assert df.set_index("image_id").loc[2, "boxes"] == [[5, 5, 10, 10]] and df.set_index("image_id").loc[2, "ann_ids"] == [100]
    # evaluation ground truth: the crowd region, the too-small box, the official (unclipped) boxes, ids 1..N
    gt = json.loads((out / "instances_train.json").read_text())
    assert sorted(a["source_id"] for a in gt["annotations"]) == [100, 100, 101, 102, 104, 109]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4, 5, 6]
    by_source = {(a["image_id"], a["source_id"]): a for a in gt["annotations"]}
    assert by_source[1, 102]["iscrowd"] == 1 and by_source[1, 101]["bbox"] == [70, 50, 30, 30]
    assert by_source[1, 100]["area"] == 400 and by_source[1, 104]["area"] == 30
    assert sorted(im["id"] for im in gt["images"]) == [1, 2, 3]
    # every dropped image and box has a row
    rows = list(csv.DictReader(open(out / "rejected.csv")))
    assert set(rows[0]) == {"split", "file", "image_id", "ann_id", "reason"}
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 7 + 9
    # exactly one image-level row (empty ann_id) per rejected image entry; every box row names its annotation
    image_rows = [r for r in train_rows if r["ann_id"] == ""]
    assert len(image_rows) == sum(m["images_rejected"].values()) == m["images"] - m["images_kept"]
    assert {r["reason"] for r in image_rows} == set(m["images_rejected"])
    assert {(r["image_id"], r["ann_id"]) for r in train_rows if r["reason"] == "image_rejected"} == {("12", "110"), ("15", "111")}
    assert any(r["reason"] == "malformed_annotation" and r["ann_id"] == "#13" for r in train_rows)
    assert any(r["reason"] == "truncated" and r["file"].endswith("trunc.jpg") for r in train_rows)
    assert any(r["reason"] == "unknown_category" and r["ann_id"] == "105" for r in train_rows)

    split = load_split(out, "train")
    rec = {r.image_id: r for r in split.images}[1]
    np.testing.assert_allclose(rec.boxes[1], [70, 50, 80, 60])  # xyxy
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64 and rec.iscrowd.tolist() == [False, False, True]
    assert [c.label for c in split.categories] == [1, 2]


def test_index_is_reproducible_and_follows_the_raw_data(tmp_path):
    """Same data -> byte-identical data/index; new pixels at the same size -> a different source.json."""
    img_dir, ann = tmp_path / "images", tmp_path / "train.json"
    img_dir.mkdir()
    cv2.imwrite(str(img_dir / "a.png"), _img(40, 50))
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
                               "categories": [{"id": 1, "name": "thing"}]}))
    data = _local_data(img_dir, ann, img_dir, ann)

    def index_bytes(out):
        prepare(data, seed=0, root=tmp_path)
        build_index("data/raw/manifest.json", IndexParams(), tmp_path / out, tmp_path / "metrics.json", root=tmp_path)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / out).iterdir())}

    first = index_bytes("index")
    assert first == index_bytes("index") == index_bytes("index2")
    source = json.loads(first["source.json"])
    assert source["source"] == "local" and set(source["fingerprint"]) == {"train", "val"}
    cv2.imwrite(str(img_dir / "a.png"), _img(40, 50, seed=1))  # same size and annotations, other pixels
    changed = index_bytes("index")
    assert changed["source.json"] != first["source.json"]
    assert {k for k in first if changed[k] != first[k]} == {"source.json"}


def test_fingerprint_covers_images_in_subfolders(tmp_path):
    from mitdet.data.sources import fingerprint
    (tmp_path / "images" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "top.png"), _img(20, 30))
    cv2.imwrite(str(tmp_path / "images" / "sub" / "x.png"), _img(20, 30))
    (tmp_path / "ann.json").write_text("{}")
    first = fingerprint(tmp_path / "images", tmp_path / "ann.json")
    assert first["images"] == 2 and first == fingerprint(tmp_path / "images", tmp_path / "ann.json")
    cv2.imwrite(str(tmp_path / "images" / "sub" / "x.png"), _img(20, 30, seed=1))  # same size, other pixels
    assert fingerprint(tmp_path / "images", tmp_path / "ann.json")["images_sha256"] != first["images_sha256"]


def test_malformed_json_and_missing_split_are_clear_errors(tmp_path):
    manifest = _dataset(tmp_path)
    (tmp_path / "val.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"val\.json: not valid JSON"):
        build_index(manifest, IndexParams(), tmp_path / "index")
    (tmp_path / "val.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(DataError, match=r"val\.json: field `annotations` is missing"):
        build_index(manifest, IndexParams(), tmp_path / "index")
    (tmp_path / "val.json").unlink()
    with pytest.raises(DataError, match=r"val\.json: COCO annotation file not found"):
        build_index(manifest, IndexParams(), tmp_path / "index")
    m = json.loads(manifest.read_text())
    del m["splits"]["val"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"manifest\.json: split 'val' is missing"):
        build_index(manifest, IndexParams(), tmp_path / "index")
    with pytest.raises(DataError, match=r"val\.jsonl: no index yet.*`dvc repro build_index`"):
        load_split(tmp_path / "index", "val")


def _local_data(train_images, train_ann, val_images, val_ann):
    data = load_params(ROOT / "params.yaml").data
    local = LocalParams(train=SplitPaths(str(train_images), str(train_ann)), val=SplitPaths(str(val_images), str(val_ann)))
    return dataclasses.replace(data, source="local", local=local)


@pytest.mark.parametrize("name", ["coco2017-tiny50", "coco128"])
def test_local_source_on_real_coco_fixtures(tmp_path, name):
    fx = FIXTURES / name
    if not fx.is_dir():
        pytest.skip(f"{fx} is absent (the shared fixtures live beside the repository in ../shared)")
    if name == "coco128":  # one split in two roles, as its README says
        args = (fx / "train2017", fx / "annotations/instances_train2017.json") * 2
    else:
        args = (fx / "train2017", fx / "annotations/instances_train2017.json", fx / "val2017",
                fx / "annotations/instances_val2017.json")
    manifest = prepare(_local_data(*args), seed=0, root=tmp_path)
    assert manifest["source"] == "local" and manifest["splits"]["train"]["images"] == str(args[0])
    metrics = build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=2), tmp_path / "index",
                          root=tmp_path)
    for split, ann in (("train", args[1]), ("val", args[3])):
        coco = json.loads(Path(ann).read_text())
        m = metrics["splits"][split]
        assert m["images_kept"] == len(coco["images"]) and m["images_rejected"] == {}
        assert m["annotations_kept"] + sum(m["annotations_rejected"].values()) == len(coco["annotations"])
        assert m["crowd_kept"] == sum(a["iscrowd"] for a in coco["annotations"])
    cats = json.loads((tmp_path / "index" / "categories.json").read_text())
    assert len(cats) == 80 and cats[-1] == {"id": 90, "name": "toothbrush", "label": 80}

    # the evaluation ground truth is valid COCO: itself as detections scores AP 1.0
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(tmp_path / "index" / "instances_val.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_local_source_requires_existing_paths(tmp_path):
    data = _local_data(tmp_path / "nope", tmp_path / "nope.json", tmp_path / "nope", tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"data\.local\.train\.images"):
        prepare(data, seed=0, root=tmp_path)


def test_default_local_paths_point_at_the_committed_example(tmp_path):
    params = load_params(ROOT / "params.yaml")
    for split in ("train", "val"):
        paths = getattr(params.data.local, split)
        assert (ROOT / paths.images).is_dir() and (ROOT / paths.annotations).is_file()
    # prepared into a temp root: writing the repo's data/raw is the stage's job, not a test's
    data = _local_data(*(ROOT / p for s in ("train", "val") for p in (getattr(params.data.local, s).images,
                                                                       getattr(params.data.local, s).annotations)))
    prepare(data, seed=0, root=tmp_path)
    metrics = build_index("data/raw/manifest.json", params.index, tmp_path / "index", root=tmp_path)
    assert metrics["splits"]["train"]["images_kept"] == 4 and metrics["splits"]["val"]["images_kept"] == 2


def test_coco_shape_check_names_the_entry():
    ok = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}],
          "categories": [{"id": 2, "name": "cat"}]}
    assert check_coco(ok, "gt.json", strict=True) is ok
    with pytest.raises(DataError, match=r"^gt\.json: expected a COCO object .*got a JSON array; fix it$"):
        check_coco([], "gt.json", fix="fix it")
    with pytest.raises(DataError, match=r"gt\.json: categories\[0\] needs an integer `id`"):
        check_coco({**ok, "categories": [{"id": "2", "name": "cat"}]}, "gt.json")
    bad_box = {**ok, "annotations": [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1]}]}
    check_coco(bad_box, "gt.json")  # build_index counts such entries itself
    with pytest.raises(DataError, match=r"gt\.json: annotations\[0\] needs"):
        check_coco(bad_box, "gt.json", strict=True)
    with pytest.raises(DataError, match=r"gt\.json: images\[0\] needs an integer `id`"):
        check_coco({**ok, "images": ["x.jpg"]}, "gt.json", strict=True)


def test_ground_truth_written_in_pieces_is_one_compact_json(tmp_path):
    """instances_<split>.json is serialised image by image; it must read back and be byte for byte what one dump
    of the whole object writes (the format of earlier versions), and gc is back on afterwards."""
    import gc

    import mitdet.data.build_index as index_mod
    manifest = _dataset(tmp_path)
    build_index(manifest, IndexParams(), tmp_path / "index")
    assert gc.isenabled()
    for split in ("train", "val"):
        raw = (tmp_path / "index" / f"instances_{split}.json").read_bytes()
        gt = json.loads(raw)
        assert list(gt) == ["info", "licenses", "images", "annotations", "categories"]
        assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
        assert raw.decode() == index_mod._dumps(gt)
