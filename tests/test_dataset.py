"""DetectionDataset, collate, samplers and build_loader on real photos and written JPEG/PNG files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mitdet.data.dataset import DetectionDataset, build_loader, collate
from mitdet.data.index import build_index, load_split
from mitdet.data.sampler import GroupedBatchSampler, aspect_ratio_groups
from mitdet.data.transforms import build_transform
from mitdet.params import AugmentParams, IndexParams, ModelParams, TrainParams

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "fixtures" / "coco2017-tiny50"
MODEL = ModelParams(min_size=96, max_size=160)
TRAIN = TrainParams(augment=AugmentParams(hflip=0.5, color_jitter=0.3, multi_scale=[80, 96, 112]))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    """tiny50 photos plus a grayscale JPEG, a PNG and one image that is corrupted after indexing."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} is absent (the shared fixtures live beside the repository in ../shared)")
    tmp = tmp_path_factory.mktemp("data")
    img_dir = tmp / "train"
    shutil.copytree(TINY / "train2017", img_dir)
    coco = json.loads((TINY / "annotations/instances_train2017.json").read_text())
    rng = np.random.default_rng(0)
    extra = {"gray.jpg": rng.integers(0, 255, (90, 120), dtype=np.uint8),
             "rgba.png": rng.integers(0, 255, (130, 70, 4), dtype=np.uint8),
             "broken.jpg": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)}
    for i, (name, px) in enumerate(extra.items()):
        cv2.imwrite(str(img_dir / name), px)
        coco["images"].append({"id": 900 + i, "file_name": name, "width": px.shape[1], "height": px.shape[0]})
        coco["annotations"].append({"id": 9000 + i, "image_id": 900 + i, "category_id": 1, "bbox": [5, 6, 30, 40],
                                    "iscrowd": 0, "area": 1200})
    (tmp / "train.json").write_text(json.dumps(coco))
    manifest = {"source": "local", "splits": {s: {"images": str(img_dir), "annotations": str(tmp / "train.json")}
                                              for s in ("train", "val")}}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    build_index(tmp / "manifest.json", IndexParams(min_box_size=1.0, workers=1), tmp / "index")
    (img_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage that no decoder accepts")  # fails at training time
    return tmp / "index"


def _batches(loader):
    out = []
    for images, targets, skipped in loader:
        out.append(([t["image_id"] for t in targets], [i.clone() for i in images],
                    [t["boxes"].clone() for t in targets], skipped))
    return out


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
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            expected = torch.from_numpy(rec.boxes[~rec.iscrowd]) * target["scale"]
            torch.testing.assert_close(boxes, expected, atol=1.0, rtol=0.02)
            assert target["labels"].min() >= 1 and target["labels"].max() <= len(split.categories)
    assert crowd_seen and failed == 1
    for name in ("gray.jpg", "rgba.png"):  # decoded to 3 channels
        image, _ = ds[by_id[900 if name == "gray.jpg" else 901]]
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
    assert len(full) == len(build_loader(split, num_workers=0, **kw)) == 14
    for a, b in zip(full, again, strict=True):
        assert a[0] == b[0] and a[3] == b[3]
        for x, y in zip(a[1] + a[2], b[1] + b[2]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sum(b[3] for b in full) == 1  # the broken image, skipped and counted once per epoch
    # augmentations really happen and differ between epochs: the same image, two epochs, other pixels (and
    # another batch order); the same (seed, epoch) reproduces them exactly
    other_epoch = _batches(build_loader(split, num_workers=0, epoch=2, **kw))
    assert [b[0] for b in other_epoch] != [b[0] for b in full]
    by_id_1 = {i: img for b in full for i, img in zip(b[0], b[1])}
    by_id_2 = {i: img for b in other_epoch for i, img in zip(b[0], b[1])}
    assert by_id_1.keys() == by_id_2.keys()
    same_shape = [i for i in by_id_1 if by_id_1[i].shape == by_id_2[i].shape]
    assert same_shape and any(not torch.equal(by_id_1[i], by_id_2[i]) for i in same_shape)  # not only the scale
    again_epoch = _batches(build_loader(split, num_workers=0, epoch=2, **kw))
    for a, b in zip(other_epoch, again_epoch, strict=True):
        assert a[0] == b[0]
        for x, y in zip(a[1] + a[2], b[1] + b[2]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # resuming at batch k replays exactly the rest of the uninterrupted epoch
    k = 5
    resumed = _batches(build_loader(split, num_workers=0, epoch=1, skip_batches=k, **kw))
    assert len(resumed) == len(full) - k
    for a, b in zip(full[k:], resumed, strict=True):
        assert a[0] == b[0]
        for x, y in zip(a[1] + a[2], b[1] + b[2]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # aspect grouping holds in the loader: most batches share one orientation
    uniform = sum(len({img.shape[1] >= img.shape[2] for img in b[1]}) == 1 for b in full)
    assert uniform >= len(full) - 3


def test_hflip_moves_boxes(index_dir):
    split = load_split(index_dir, "train")
    rec_i = next(i for i, r in enumerate(split.images) if len(r.boxes) and not r.iscrowd.any() and "broken" not in r.file)
    rec = split.images[rec_i]
    flip = DetectionDataset(split, build_transform(MODEL, AugmentParams(hflip=1.0), seed=0))
    plain = DetectionDataset(split, build_transform(MODEL, None, seed=0))
    (img_f, t_f), (img_p, t_p) = flip[(rec_i, 0)], plain[rec_i]
    torch.testing.assert_close(img_f, img_p.flip(-1))
    w = img_p.shape[2]
    torch.testing.assert_close(t_f["boxes"][:, [2, 0]], w - t_p["boxes"][:, [0, 2]], atol=1e-3, rtol=0)
    assert rec.image_id == t_f["image_id"]
