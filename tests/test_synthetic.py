"""The embedded synthetic dataset: deterministic, valid COCO, and the variety the pipeline must handle."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from mitdet.data.dataset import DetectionDataset
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split
from mitdet.data.sources import prepare
from mitdet.data.synthetic import CATEGORIES, generate
from mitdet.data.transforms import build_transform
from mitdet.params import IndexParams, SyntheticParams, load_params

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticParams(train_images=40, val_images=6, min_side=128, max_side=192, max_objects=6,
                        grayscale_fraction=0.2, empty_fraction=0.1, crowd_fraction=0.2, jpeg_quality=90)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    generate(tmp_path / "a", SMALL, seed=5)
    generate(tmp_path / "b", SMALL, seed=5)
    generate(tmp_path / "c", SMALL, seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 40 + 6 + 2 and a == b
    assert a["train/000000000001.jpg"] != c["train/000000000001.jpg"]


def test_coco_format_and_variety(tmp_path):
    splits = generate(tmp_path, SMALL, seed=0)
    coco = json.loads(Path(splits["train"]["annotations"]).read_text())
    ids = [c["id"] for c in coco["categories"]]
    assert len(ids) >= 8 and ids != list(range(1, len(ids) + 1))  # non-contiguous, like COCO's
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    shapes, gray = set(), 0
    for im in coco["images"]:
        px = cv2.imread(str(Path(splits["train"]["images"]) / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert px.shape[:2] == (im["height"], im["width"])
        assert SMALL.min_side <= min(px.shape[:2]) and max(px.shape[:2]) <= SMALL.max_side
        iw, ih = im["width"], im["height"]
        shapes.add("landscape" if iw > ih else "portrait" if iw < ih else "square")
        gray += px.ndim == 2
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            assert a["category_id"] in ids and w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
    assert {"landscape", "portrait"} <= shapes
    assert gray >= 1
    assert len(by_image) < len(coco["images"])  # some images without objects
    assert any(a["iscrowd"] for a in coco["annotations"])
    areas = np.array([a["area"] for a in coco["annotations"] if not a["iscrowd"]])
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    assert small > 0 and large > 0 and small < 0.5  # COCO's three area ranges, mostly medium/large
    assert len({a["category_id"] for a in coco["annotations"]}) == len(CATEGORIES)
    # objects overlap (partial occlusion) somewhere
    overlaps = 0
    for anns in by_image.values():
        boxes = [a["bbox"] for a in anns if not a["iscrowd"]]
        for i in range(len(boxes)):
            for j in range(i):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                overlaps += min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2)
    assert overlaps > 0


def test_class_colour_is_a_strong_cue(tmp_path):
    """Learnability: in colour images, an object's own pixels sit far nearer its class colour than another's."""
    splits = generate(tmp_path, dataclasses.replace(SMALL, grayscale_fraction=0.0, crowd_fraction=0.0), seed=1)
    coco = json.loads(Path(splits["train"]["annotations"]).read_text())
    colors = {c["id"]: np.array(c["color"], np.float32) for c in CATEGORIES}
    images = {im["id"]: im for im in coco["images"]}
    hits = total = 0
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        px = cv2.imread(str(Path(splits["train"]["images"]) / im["file_name"])).astype(np.float32)
        x, y, w, h = (int(v) for v in a["bbox"])
        crop = px[y:y + h, x:x + w].reshape(-1, 3)
        # the most common nearest class colour among the box's pixels close to any class colour
        d = np.linalg.norm(crop[:, None, :] - np.stack(list(colors.values()))[None], axis=2)
        near = d.min(1) < 60
        if near.sum() < 10:
            continue
        votes = np.bincount(d[near].argmin(1), minlength=len(colors))
        hits += list(colors)[votes.argmax()] == a["category_id"]
        total += 1
    assert total > 50 and hits / total > 0.8


def test_prepare_synthetic_then_index(tmp_path):
    params = load_params(ROOT / "params.yaml")
    data = dataclasses.replace(params.data, source="synthetic",
                               synthetic=dataclasses.replace(SMALL, train_images=12, val_images=4))
    manifest = prepare(data, seed=0, root=tmp_path)
    assert manifest["splits"]["train"] == {"images": "data/raw/synthetic/train",
                                           "annotations": "data/raw/synthetic/annotations/instances_train.json"}
    saved = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    assert saved == manifest and saved["fingerprint"]["train"]["images"] == 12
    # a second prepare is identical (manifest too: it fingerprints content, not times)
    assert prepare(data, seed=0, root=tmp_path) == manifest
    metrics = build_index("data/raw/manifest.json", IndexParams(), tmp_path / "index", root=tmp_path)
    assert metrics["splits"]["train"]["images_kept"] == 12 and metrics["splits"]["val"]["images_kept"] == 4
    assert metrics["categories"] == len(CATEGORIES)
    split = load_split(tmp_path / "index", "train", root=tmp_path)
    assert all(Path(r.file).is_file() for r in split.images)
    assert {int(label) for r in split.images for label in r.labels} <= set(range(1, len(CATEGORIES) + 1))


def test_smallest_images_with_crowds(tmp_path):
    """min_side = max_side = 32 (the smallest allowed) with a crowd region in every image: crowd regions can be
    narrower than a crowd shape, which must not make the generator fail."""
    tiny = dataclasses.replace(SMALL, train_images=30, val_images=2, min_side=32, max_side=32, empty_fraction=0.0,
                               crowd_fraction=1.0)
    splits = generate(tmp_path, tiny, seed=0)
    coco = json.loads(Path(splits["train"]["annotations"]).read_text())
    assert len(coco["images"]) == 30 and all(im["width"] == im["height"] == 32 for im in coco["images"])
    assert any(a["iscrowd"] for a in coco["annotations"])
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x + w <= 32 and y + h <= 32


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for name, data in _files(root).items():
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


def test_aux_none_files_as_before(tmp_path):
    """With aux none (the default) every generated file is byte-identical to what the generator wrote before the
    thermal option (hashes computed then)."""
    generate(tmp_path / "small", SMALL, seed=5)
    generate(tmp_path / "default", SyntheticParams(train_images=20, val_images=5), seed=0)
    assert _digest(tmp_path / "small") == "8ec5f43449bf3edd7040ae9feabe3b0d1d4255b57ed18020f80fe5e7df9ac810"
    assert _digest(tmp_path / "default") == "2d266d415a5576faae29f94cb6c412b678438f07afed96ad824381a32e417d15"


def test_thermal_twins_same_rgb_other_thermal(tmp_path):
    """Thermal: the JPEGs are the aux-none ones byte for byte; twin classes split into _warm/_cold that differ
    only in the 16-bit thermal PNG (warm: hot over the object, cold: near the background)."""
    thermal = dataclasses.replace(SMALL, aux="thermal", grayscale_fraction=0.0)
    plain = generate(tmp_path / "plain", dataclasses.replace(thermal, aux="none"), seed=5)
    splits = generate(tmp_path / "thermal", thermal, seed=5)
    generate(tmp_path / "again", thermal, seed=5)
    assert _files(tmp_path / "thermal") == _files(tmp_path / "again")
    assert "aux" not in plain["train"] and splits["train"]["aux"] == str(tmp_path / "thermal/train_aux")
    coco_p = json.loads(Path(plain["train"]["annotations"]).read_text())
    coco_t = json.loads(Path(splits["train"]["annotations"]).read_text())
    assert coco_p["images"] == coco_t["images"]
    names = {c["id"]: c["name"] for c in coco_t["categories"]}
    assert sorted(n for n in names.values() if n.endswith(("_warm", "_cold"))) == [
        "circle_cold", "circle_warm", "square_cold", "square_warm", "star_cold", "star_warm"]
    assert len(names) == len(CATEGORIES) + 3 and list(names) != list(range(1, len(names) + 1))
    plain_names = {c["id"]: c["name"] for c in coco_p["categories"]}
    hot = {"warm": [], "cold": []}
    for a_p, a_t in zip(coco_p["annotations"], coco_t["annotations"], strict=True):
        assert {**a_t, "category_id": 0} == {**a_p, "category_id": 0}
        assert names[a_t["category_id"]].split("_")[0] == plain_names[a_p["category_id"]]
        name = names[a_t["category_id"]]
        if name.endswith(("_warm", "_cold")) and not a_t["iscrowd"]:
            file = f"{a_t['image_id']:012d}"
            assert (tmp_path / f"plain/train/{file}.jpg").read_bytes() == \
                (tmp_path / f"thermal/train/{file}.jpg").read_bytes()
            heat = cv2.imread(str(tmp_path / f"thermal/train_aux/{file}.png"), cv2.IMREAD_UNCHANGED)
            assert heat.dtype == np.uint16 and heat.ndim == 2
            x, y, w, h = (int(v) for v in a_t["bbox"])
            background = np.median(heat)
            hot[name[-4:]].append(np.count_nonzero(heat[y:y + h, x:x + w] > background + 6000) / a_t["area"])
    assert len(hot["warm"]) > 5 and len(hot["cold"]) > 5
    assert np.median(hot["warm"]) > 0.9 and np.median(hot["cold"]) < 0.05
    for name, data in _files(tmp_path / "plain").items():  # every RGB image, not only those with twins
        if name.endswith(".jpg"):
            assert (tmp_path / "thermal" / name).read_bytes() == data


def test_prepare_thermal_then_rgbx_items(tmp_path):
    params = load_params(ROOT / "params.yaml")
    data = dataclasses.replace(params.data, source="synthetic",
                               synthetic=dataclasses.replace(SMALL, train_images=6, val_images=2, aux="thermal"))
    manifest = prepare(data, seed=0, root=tmp_path)
    assert manifest["splits"]["train"]["aux"] == "data/raw/synthetic/train_aux"
    build_index("data/raw/manifest.json", IndexParams(aux_channels=1), tmp_path / "index", root=tmp_path)
    split = load_split(tmp_path / "index", "train", root=tmp_path)
    assert split.aux_channels == 1 and len(split.images) == 6
    model = dataclasses.replace(params.model, modality="rgbx")
    ds = DetectionDataset(split, build_transform(model, None, seed=0))
    spread = []
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape[0] == 4 and 0 <= image.min() and image.max() <= 1
        assert 0.2 < image[3].mean() < 0.7  # the thermal background level (18000-26000 of 65535, warm objects)
        spread.append(float(image[3].std()))
    assert min(spread) > 0.001 and max(spread) > 0.05  # gradient and noise everywhere, warm objects somewhere


def test_parallel_generation_is_byte_identical(tmp_path, monkeypatch):
    """Images made by two processes over several chunks give the same files as one process (thermal included)."""
    import mitdet.data.synthetic as synthetic
    monkeypatch.setattr(synthetic, "INLINE_BELOW", 0)  # a pool even for a few images
    monkeypatch.setattr(synthetic, "GENERATE_CHUNK", 3)  # several chunks per split, the last one short
    params = dataclasses.replace(SMALL, train_images=8, val_images=4, aux="thermal")
    one = generate(tmp_path / "one", params, seed=3, workers=1)
    two = generate(tmp_path / "two", params, seed=3, workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 2 * 12 + 2 and files == sorted(p.relative_to(tmp_path / "two")
                                                         for p in (tmp_path / "two").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert set(one) == set(two) == {"train", "val"}
