"""DetectionDataset, collate, samplers and build_loader on real photos and written JPEG/PNG files."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mitdet.data.dataset import DetectionDataset, build_loader, collate
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split
from mitdet.data.sampler import GroupedBatchSampler, aspect_ratio_groups
from mitdet.data.transforms import build_transform
from mitdet.params import AugmentParams, IndexParams, ModelParams, TrainParams

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "fixtures" / "coco2017-tiny50"
MODEL = ModelParams(min_size=96, max_size=160)
TRAIN = TrainParams(augment=AugmentParams(hflip=0.5, color_jitter=0.3, multi_scale=[80, 96, 112]))
EXTRA_IDS = {"gray.jpg": 900, "rgba.png": 901, "broken.jpg": 902}
# generated data: (width, height) cycled over the images, so every aspect group holds several images
GENERATED_SIZES = [(160, 120), (100, 150), (128, 128), (180, 110)]
GENERATED_CATEGORIES = [{"id": 3, "name": "square", "color": (230, 230, 230)},
                        {"id": 7, "name": "bar", "color": (200, 245, 240)}]  # both bright: found by a threshold
BRIGHT = 130  # channel mean: objects are above it after colour jitter, the background is far below


def _add_extras_and_index(tmp: Path, img_dir: Path, coco: dict) -> Path:
    """Add a grayscale JPEG, a PNG and one image corrupted after indexing; index the lot with build_index."""
    rng = np.random.default_rng(0)
    extra = {"gray.jpg": rng.integers(0, 255, (90, 120), dtype=np.uint8),
             "rgba.png": rng.integers(0, 255, (130, 70, 4), dtype=np.uint8),
             "broken.jpg": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)}
    category = coco["categories"][0]["id"]
    for name, px in extra.items():
        image_id = EXTRA_IDS[name]
        cv2.imwrite(str(img_dir / name), px)
        coco["images"].append({"id": image_id, "file_name": name, "width": px.shape[1], "height": px.shape[0]})
        coco["annotations"].append({"id": 10 * image_id, "image_id": image_id, "category_id": category,
                                    "bbox": [5, 6, 30, 40], "iscrowd": 0, "area": 1200})
    (tmp / "train.json").write_text(json.dumps(coco))
    manifest = {"source": "local", "splits": {s: {"images": str(img_dir), "annotations": str(tmp / "train.json")}
                                              for s in ("train", "val")}}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    build_index(tmp / "manifest.json", IndexParams(min_box_size=1.0, workers=1), tmp / "index")
    (img_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage that no decoder accepts")  # fails at training time
    return tmp / "index"


def _generated_coco(img_dir: Path, n: int = 30) -> dict:
    """`n` real JPEGs written with cv2: a dark noisy background with 0-2 bright, separated rectangles (COCO boxes
    are their exact pixel extents); one crowd region; COCO's non-contiguous category ids."""
    rng = np.random.default_rng(1)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": c["id"], "name": c["name"]} for c in GENERATED_CATEGORIES]}
    for i in range(n):
        w, h = GENERATED_SIZES[i % len(GENERATED_SIZES)]
        img = rng.integers(20, 50, (h, w, 3), dtype=np.uint8)
        image_id = i + 1
        coco["images"].append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": w, "height": h})
        for k in range(i % 3):  # 0, 1 or 2 objects; two sit in the left and the right half
            half = w // 2
            bw, bh = int(rng.integers(12, half - 16)), int(rng.integers(12, h - 16))
            x, y = k * half + int(rng.integers(4, half - bw - 4)), int(rng.integers(4, h - bh - 4))
            cat = GENERATED_CATEGORIES[int(rng.integers(len(GENERATED_CATEGORIES)))]
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), cat["color"], -1)
            coco["annotations"].append({"id": 100 * image_id + k, "image_id": image_id, "category_id": cat["id"],
                                        "bbox": [x, y, bw, bh], "iscrowd": 0, "area": bw * bh})
        if i == 4:  # a crowd region (evaluation-only): not drawn, never a training target
            coco["annotations"].append({"id": 100 * image_id + 9, "image_id": image_id, "category_id": 3,
                                        "bbox": [0, 0, 40, 30], "iscrowd": 1, "area": 1200})
        cv2.imwrite(str(img_dir / f"{image_id:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return coco


@pytest.fixture(scope="module")
def generated_index(tmp_path_factory):
    """Generated JPEGs of three aspect groups, indexed by build_index, plus the same extras as tiny50's."""
    tmp = tmp_path_factory.mktemp("generated")
    img_dir = tmp / "train"
    img_dir.mkdir()
    return _add_extras_and_index(tmp, img_dir, _generated_coco(img_dir))


@pytest.fixture(scope="module")
def tiny50_index(tmp_path_factory):
    """tiny50 photos plus a grayscale JPEG, a PNG and one image that is corrupted after indexing."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} is absent (the shared fixtures live beside the repository in ../shared)")
    tmp = tmp_path_factory.mktemp("data")
    img_dir = tmp / "train"
    shutil.copytree(TINY / "train2017", img_dir)
    coco = json.loads((TINY / "annotations/instances_train2017.json").read_text())
    return _add_extras_and_index(tmp, img_dir, coco)


@pytest.fixture(params=["generated", "tiny50"])
def index_dir(request):
    """Every loader test runs on generated files (always) and on the real COCO photos (when present)."""
    return request.getfixturevalue(f"{request.param}_index")


def _batches(loader):
    out = []
    for images, targets, skipped in loader:
        out.append(([t["image_id"] for t in targets], [i.clone() for i in images],
                    [t["boxes"].clone() for t in targets], skipped))
    return out


def _assert_identical(batches_a, batches_b):
    """The same batches: image ids, skip counts, and bit-identical images and boxes."""
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a[0] == b[0] and a[3] == b[3]
        for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_items_shapes_boxes_and_crowd(index_dir):
    split = load_split(index_dir, "train")
    ds = DetectionDataset(split, build_transform(MODEL, None, seed=0))
    by_id = {r.image_id: i for i, r in enumerate(split.images)}
    crowd_seen, failed = False, 0
    for i, rec in enumerate(split.images):
        item = ds[i]
        if Path(rec.file).name == "broken.jpg":
            assert item is None
            failed += 1
            continue
        image, target = item
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        h, w = image.shape[1:]
        assert min(h, w) == MODEL.min_size or max(h, w) == MODEL.max_size
        assert max(h, w) <= MODEL.max_size
        assert target["orig_size"] == (rec.height, rec.width)
        assert target["scale"] == pytest.approx(h / rec.height, rel=0.02)
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert len(boxes) == int((~rec.iscrowd).sum())  # crowd regions are not training targets
        crowd_seen |= bool(rec.iscrowd.any())
        if len(boxes):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            expected = torch.from_numpy(rec.boxes[~rec.iscrowd]) * target["scale"]
            torch.testing.assert_close(boxes, expected, atol=1.0, rtol=0.02)
            assert target["labels"].min() >= 1 and target["labels"].max() <= len(split.categories)
    assert crowd_seen and failed == 1
    for name in ("gray.jpg", "rgba.png"):  # decoded to 3 channels
        image, _ = ds[by_id[EXTRA_IDS[name]]]
        assert image.shape[0] == 3


def test_collate_drops_and_counts_undecodable(index_dir):
    split = load_split(index_dir, "train")
    loader = build_loader(split, model=MODEL, train=None, seed=0, training=False, batch_size=64, num_workers=0)
    images, targets, skipped = next(iter(loader))
    assert skipped == 1 and len(images) == len(targets) == len(split.images) - 1
    assert collate([None, None]) == ([], [], 2)


def test_eval_loader_is_ordered_and_limited(index_dir):
    split = load_split(index_dir, "train")
    loader = build_loader(split, model=MODEL, train=None, seed=0, training=False, batch_size=4, num_workers=0,
                          limit_images=10)
    assert len(loader) == 3
    ids = [t["image_id"] for _, targets, _ in loader for t in targets]
    assert ids == [r.image_id for r in split.images[:10]]


def test_grouped_sampler_groups_shards_and_resumes():
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(50, 200, 103), rng.integers(50, 200, 103)
    groups = aspect_ratio_groups(widths, heights)
    s = GroupedBatchSampler(groups, batch_size=4, seed=7)
    batches = s.batches(0)
    assert len(batches) == len(s) == 26
    assert sorted(i for b in batches for i in b) == list(range(103))
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= len(set(groups)) - 1  # only the leftovers of the groups share a batch
    assert batches == GroupedBatchSampler(groups, 4, seed=7).batches(0)
    assert batches != s.batches(1) and batches != GroupedBatchSampler(groups, 4, seed=8).batches(0)
    # distributed: equal batch counts, the ranks together cover every image
    ranks = [GroupedBatchSampler(groups, 4, seed=7, rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert len({len(r.batches(0)) for r in ranks}) == 1
    assert set(i for r in ranks for b in r.batches(0) for i in b) == set(range(103))
    # resume: skip k batches of the given epoch only
    resumed = GroupedBatchSampler(groups, 4, seed=7, epoch=0, skip_batches=5)
    assert [[i for i, _ in b] for b in resumed] == batches[5:]
    resumed.set_epoch(1)
    assert [[i for i, _ in b] for b in resumed] == s.batches(1)


def test_same_seed_same_batches_and_resume_replays(index_dir):
    split = load_split(index_dir, "train")
    kw = dict(model=MODEL, train=TRAIN, seed=3, training=True, batch_size=4)
    full = _batches(build_loader(split, num_workers=0, epoch=1, **kw))
    again = _batches(build_loader(split, num_workers=2, epoch=1, **kw))  # workers do not change the result
    assert len(full) == len(build_loader(split, num_workers=0, **kw)) == math.ceil(len(split.images) / 4)
    _assert_identical(full, again)
    assert sum(b[3] for b in full) == 1  # the broken image, skipped and counted once per epoch
    # augmentations really happen and differ between epochs: the same image, two epochs, other pixels (and
    # another batch order); the same (seed, epoch) reproduces them exactly
    other_epoch = _batches(build_loader(split, num_workers=0, epoch=2, **kw))
    assert [b[0] for b in other_epoch] != [b[0] for b in full]
    by_id_1 = {i: img for b in full for i, img in zip(b[0], b[1], strict=True)}
    by_id_2 = {i: img for b in other_epoch for i, img in zip(b[0], b[1], strict=True)}
    assert by_id_1.keys() == by_id_2.keys()
    same_shape = [i for i in by_id_1 if by_id_1[i].shape == by_id_2[i].shape]
    assert same_shape and any(not torch.equal(by_id_1[i], by_id_2[i]) for i in same_shape)  # not only the scale
    again_epoch = _batches(build_loader(split, num_workers=0, epoch=2, **kw))
    _assert_identical(other_epoch, again_epoch)
    # resuming at batch k replays exactly the rest of the uninterrupted epoch
    k = 5
    resumed = _batches(build_loader(split, num_workers=0, epoch=1, skip_batches=k, **kw))
    assert len(resumed) == len(full) - k
    _assert_identical(full[k:], resumed)
    # aspect grouping holds in the loader: only the groups' leftovers share a batch; most batches share one
    # orientation
    group_of = dict(zip([r.image_id for r in split.images],
                        aspect_ratio_groups([r.width for r in split.images], [r.height for r in split.images]),
                        strict=True))
    mixed = [b[0] for b in full if len({group_of[i] for i in b[0]}) > 1]
    assert len(mixed) <= len(set(group_of.values())) - 1, mixed
    uniform = sum(len({img.shape[1] >= img.shape[2] for img in b[1]}) == 1 for b in full)
    assert uniform >= len(full) - 3


def test_hflip_moves_boxes(index_dir):
    split = load_split(index_dir, "train")
    rec_i = next(i for i, r in enumerate(split.images)
                 if len(r.boxes) and not r.iscrowd.any() and "broken" not in r.file)
    rec = split.images[rec_i]
    flip = DetectionDataset(split, build_transform(MODEL, AugmentParams(hflip=1.0), seed=0))
    plain = DetectionDataset(split, build_transform(MODEL, AugmentParams(hflip=0.0), seed=0))  # decoded alike
    (img_f, t_f), (img_p, t_p) = flip[(rec_i, 0)], plain[rec_i]
    torch.testing.assert_close(img_f, img_p.flip(-1))
    w = img_p.shape[2]
    torch.testing.assert_close(t_f["boxes"][:, [2, 0]], w - t_p["boxes"][:, [0, 2]], atol=1e-3, rtol=0)
    assert rec.image_id == t_f["image_id"]


def _bright_extent(image: torch.Tensor, box: torch.Tensor, margin: int = 3) -> torch.Tensor:
    """xyxy pixel extent of the bright pixels around `box` (the box widened by `margin`), in `image`'s pixels."""
    h, w = image.shape[1:]
    x0, y0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
    x1, y1 = min(w, int(box[2]) + margin + 1), min(h, int(box[3]) + margin + 1)
    bright = image[:, y0:y1, x0:x1].mean(0) * 255 > BRIGHT
    assert bright.any(), f"no object pixels around the box {box.tolist()}"
    cols, rows = bright.any(0).nonzero().flatten(), bright.any(1).nonzero().flatten()
    return torch.tensor([x0 + cols.min().item(), y0 + rows.min().item(), x0 + cols.max().item() + 1,
                         y0 + rows.max().item() + 1], dtype=torch.float32)


def test_boxes_follow_the_objects_through_resize_and_flip(generated_index):
    """On generated images the objects are bright rectangles whose COCO boxes are their exact pixel extents: after
    the training transform (multi-scale resize, horizontal flip, colour jitter) every target box still bounds its
    object in the transformed pixels, within a pixel of the resize's interpolation."""
    split = load_split(generated_index, "train")
    ds = DetectionDataset(split, build_transform(MODEL, TRAIN.augment, seed=5))
    generated = [i for i, r in enumerate(split.images) if r.image_id < min(EXTRA_IDS.values()) and len(r.boxes)]
    assert len(generated) >= 10
    flipped = sizes = 0
    shapes_of: dict[int, set] = {}
    for epoch in range(3):
        for i in generated:
            rec = split.images[i]
            image, target = ds[(i, epoch)]
            assert len(target["boxes"]) == int((~rec.iscrowd).sum()) >= 1
            h, w = image.shape[1:]  # the per-axis scales: sides are rounded to whole pixels
            expected = torch.from_numpy(rec.boxes[~rec.iscrowd]) * torch.tensor([w / rec.width, h / rec.height] * 2)
            mirrored = expected[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
            is_flipped = torch.allclose(target["boxes"], mirrored, atol=1e-3) and \
                not torch.allclose(target["boxes"], expected, atol=1e-3)
            torch.testing.assert_close(target["boxes"], mirrored if is_flipped else expected, atol=1e-3, rtol=0)
            flipped += is_flipped
            shapes_of.setdefault(i, set()).add(tuple(image.shape[1:]))
            for box in target["boxes"]:
                torch.testing.assert_close(_bright_extent(image, box), box, atol=1.0, rtol=0)
            sizes += 1
    assert 0.2 < flipped / sizes < 0.8  # hflip p=0.5 really flips, not always
    assert any(len(shapes) > 1 for shapes in shapes_of.values())  # multi_scale draws other sizes per epoch
