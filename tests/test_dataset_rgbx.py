"""The RGB+X loader on real files: aux PNG (8/16-bit, 1-4 channels) and .npy through build_index and
DetectionDataset, geometry shared by every channel, colour jitter on RGB only, determinism, reduced JPEG decoding,
and the RGB path pinned to its pixels from before RGB+X."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mitdet.data.dataset import DetectionDataset, build_loader
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split
from mitdet.data.synthetic import generate
from mitdet.data.transforms import build_transform
from mitdet.params import AugmentParams, IndexParams, ModelParams, SyntheticParams, TrainParams

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "fixtures" / "coco2017-tiny50"
W, H = 96, 64
SAME = ModelParams(min_size=H, max_size=W, modality="rgbx")  # output size = input size: exact values
AUG = AugmentParams(hflip=0.5, color_jitter=0.0, multi_scale=[40, 64, 80])
RGBX = ModelParams(min_size=64, max_size=120, modality="rgbx")
RGB = ModelParams(min_size=64, max_size=120)


def _png(h: int, w: int, color_type: int, depth: int, pixels: np.ndarray) -> bytes:
    """A PNG written byte by byte (cv2 cannot write gray+alpha): pixels HxWxC in the file's channel order."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    px = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in px)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _rgb(i: int, h: int = H, w: int = W) -> np.ndarray:
    """Image i: RGB noise with a bright rectangle (HxWx3 uint8, RGB order)."""
    rng = np.random.default_rng(i)
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    img[10:40, 8 + 4 * i:50 + 4 * i] = (240, 200, 160)
    return img


def _write(tmp: Path, kind: str, n: int = 8, size: tuple[int, int] = (W, H)) -> tuple[Path, int]:
    """Images (PNG, or .npy for npy5) and aux files of `kind`, indexed with its aux_channels; (index dir, N)."""
    w, h = size
    img_dir, aux_dir = tmp / "images", tmp / "aux"
    img_dir.mkdir()
    aux_dir.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 4, "name": "box"}]}
    channels = 0
    for i in range(n):
        rgb = _rgb(i, h, w)
        name = f"{i:04d}.npy" if kind == "npy5" else f"{i:04d}.png"
        if kind == "npy5":  # channels 3, 4: copies of R and B
            np.save(img_dir / name, np.concatenate([rgb, rgb[:, :, [0]], rgb[:, :, [2]]], axis=2))
            channels = 2
        else:
            cv2.imwrite(str(img_dir / name), rgb[:, :, ::-1])
            channels = _write_aux(aux_dir / f"{i:04d}", kind, rgb)
        coco["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 4, "iscrowd": 0,
                                    "bbox": [8 + 4 * i, 10, 42, 30], "area": 42 * 30})
    (tmp / "ann.json").write_text(json.dumps(coco))
    split = {"images": str(img_dir), "annotations": str(tmp / "ann.json")}
    if kind != "npy5":
        split["aux"] = str(aux_dir)
    (tmp / "manifest.json").write_text(json.dumps({"source": "local", "splits": {"train": split, "val": split}}))
    build_index(tmp / "manifest.json", IndexParams(min_box_size=1.0, workers=1, aux_channels=channels),
                tmp / "index")
    return tmp / "index", channels


def _write_aux(base: Path, kind: str, rgb: np.ndarray) -> int:
    """Aux file of `kind` beside `base` (no extension) from image `rgb`; returns its channel count."""
    r, g, b = (rgb[:, :, c].astype(np.uint16) for c in range(3))
    if kind == "png8":  # a copy of R
        cv2.imwrite(f"{base}.png", rgb[:, :, 0])
        return 1
    if kind == "png16":
        cv2.imwrite(f"{base}.png", r * 257 + 3)
        return 1
    if kind == "png8x3":  # the file's channels: G, B, R (cv2 writes BGR: pass them reversed)
        cv2.imwrite(f"{base}.png", np.stack([rgb[:, :, 0], rgb[:, :, 2], rgb[:, :, 1]], axis=2))
        return 3
    if kind == "png16x4":  # file order: R, G, B, A(=B) in 16 bits
        cv2.imwrite(f"{base}.png", np.stack([b * 256, g * 256, r * 256, b * 256 + 1], axis=2))
        return 4
    if kind == "png_gray_alpha":  # gray = G, alpha = 255 - R
        h, w = rgb.shape[:2]
        Path(f"{base}.png").write_bytes(_png(h, w, 4, 8, np.stack([rgb[:, :, 1], 255 - rgb[:, :, 0]], axis=2)))
        return 2
    if kind == "npy16x2":  # (H, W, 2) uint16: R * 256, B * 256
        np.save(f"{base}.npy", np.stack([r * 256, b * 256], axis=2))
        return 2
    raise ValueError(kind)


def _expected_aux(kind: str, rgb: np.ndarray) -> np.ndarray:
    """The aux channels [N, H, W] in 0..1 that `kind` encodes for image `rgb`."""
    f = rgb.astype(np.float32)
    r, g, b = f[:, :, 0], f[:, :, 1], f[:, :, 2]
    table = {"png8": [r / 255], "png16": [(r * 257 + 3) / 65535], "png8x3": [g / 255, b / 255, r / 255],
             "png16x4": [r * 256 / 65535, g * 256 / 65535, b * 256 / 65535, (b * 256 + 1) / 65535],
             "png_gray_alpha": [g / 255, (255 - r) / 255], "npy16x2": [r * 256 / 65535, b * 256 / 65535],
             "npy5": [r / 255, b / 255]}
    return np.stack(table[kind]).astype(np.float32)


@pytest.mark.parametrize("kind", ["png8", "png16", "png8x3", "png16x4", "png_gray_alpha", "npy16x2", "npy5"])
def test_aux_values_channel_order_and_shape(tmp_path, kind):
    index, channels = _write(tmp_path, kind)
    split = load_split(index, "train")
    assert split.aux_channels == channels and all(r.aux for r in split.images)
    ds = DetectionDataset(split, build_transform(SAME, None, seed=0))
    for i, rec in enumerate(split.images):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3 + channels, H, W)
        rgb = _rgb(int(Path(rec.file).stem))
        torch.testing.assert_close(image[:3], torch.from_numpy(rgb.transpose(2, 0, 1)).float() / 255, rtol=0, atol=0)
        torch.testing.assert_close(image[3:], torch.from_numpy(_expected_aux(kind, rgb)), rtol=0, atol=1e-7)
        assert 0 <= image.min() and image.max() <= 1


@pytest.mark.parametrize("kind", ["png8", "npy5"])
def test_geometry_identical_on_every_channel(tmp_path, kind):
    """Aux channels that copy R (and B) stay equal to them through multi-scale resize and flip, every epoch; colour
    jitter changes RGB and leaves the aux exactly as without it."""
    index, channels = _write(tmp_path, kind)
    split = load_split(index, "train")
    plain = DetectionDataset(split, build_transform(RGBX, AUG, seed=4))
    jitter = DetectionDataset(split, build_transform(RGBX, AugmentParams(hflip=0.5, color_jitter=0.8,
                                                                          multi_scale=[40, 64, 80]), seed=4))
    shapes, flips, jittered_rgb = set(), 0, 0
    for epoch in range(3):
        for i in range(len(split.images)):
            image, target = plain[(i, epoch)]
            shapes.add(tuple(image.shape[1:]))
            copies = [0] if channels == 1 else [0, 2]
            torch.testing.assert_close(image[3:], image[copies], rtol=0, atol=0)
            flips += bool(target["boxes"][0, 0] > image.shape[2] / 2 - 8 * image.shape[2] / W)
            jittered, t_j = jitter[(i, epoch)]
            torch.testing.assert_close(jittered[3:], image[3:], rtol=0, atol=0)  # same geometry, aux untouched
            torch.testing.assert_close(t_j["boxes"], target["boxes"], rtol=0, atol=0)
            jittered_rgb += not torch.equal(jittered[:3], image[:3])
    assert len(shapes) > 1 and 0 < flips < 3 * len(split.images)
    assert jittered_rgb > len(split.images)  # p=0.8 of 3 epochs: colour jitter did change the RGB channels


def test_modality_rgb_ignores_aux_and_keeps_the_rgb_draws(tmp_path):
    index, _ = _write(tmp_path, "png16")
    split = load_split(index, "train")
    aug = AugmentParams(hflip=0.5, color_jitter=0.5, multi_scale=[40, 64, 80])
    rgb = DetectionDataset(split, build_transform(RGB, aug, seed=2))
    rgbx = DetectionDataset(split, build_transform(RGBX, aug, seed=2))
    for i in range(len(split.images)):
        (a, ta), (b, tb) = rgb[(i, 1)], rgbx[(i, 1)]
        assert a.shape[0] == 3 and b.shape[0] == 4
        torch.testing.assert_close(a, b[:3], rtol=0, atol=0)
        torch.testing.assert_close(ta["boxes"], tb["boxes"], rtol=0, atol=0)


def _batches(loader):
    return [([t["image_id"] for t in targets], [i.clone() for i in images], [t["boxes"].clone() for t in targets])
            for images, targets, _ in loader]


def test_rgbx_loader_same_with_workers_and_resumes_exactly(tmp_path):
    index, _ = _write(tmp_path, "npy5", n=12)
    split = load_split(index, "train")
    kw = dict(model=RGBX, train=TrainParams(augment=AUG), seed=3, training=True, batch_size=4)
    full = _batches(build_loader(split, num_workers=0, epoch=1, **kw))
    workers = _batches(build_loader(split, num_workers=2, epoch=1, **kw))
    resumed = _batches(build_loader(split, num_workers=0, epoch=1, skip_batches=1, **kw))
    other = _batches(build_loader(split, num_workers=0, epoch=2, **kw))
    for a, b in zip(full + full[1:], workers + resumed, strict=True):
        assert a[0] == b[0]
        assert all(x.shape[0] == 5 for x in a[1])
        for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True):
            assert torch.equal(x, y)
    by_id = {i: img for b in full for i, img in zip(b[0], b[1], strict=True)}
    assert any(not torch.equal(by_id[i], img) for b in other for i, img in zip(b[0], b[1], strict=True)
               if img.shape == by_id[i].shape)


def test_bad_aux_file_is_skipped_with_a_warning(tmp_path, caplog):
    """An aux file replaced after indexing (other size, other channel count, garbage) is skipped like an
    undecodable image, with a warning naming it and why."""
    index, _ = _write(tmp_path, "png8")
    split = load_split(index, "train")
    ds = DetectionDataset(split, build_transform(SAME, None, seed=0))
    aux = [Path(r.aux) for r in split.images]
    cv2.imwrite(str(aux[0]), np.zeros((H + 1, W), np.uint8))
    cv2.imwrite(str(aux[1]), np.zeros((H, W, 3), np.uint8))
    aux[2].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    for i, why in enumerate(["is 96x65, the image is 96x64", "has 3 channels, the index says 1",
                          "cannot be decoded"]):
        caplog.clear()
        assert ds[i] is None
        assert str(aux[i]) in caplog.text and why in caplog.text
    assert ds[3][0].shape == (4, H, W)


PINNED = {  # the RGB loader's output (images, boxes, labels) over 2 epochs, computed before RGB+X was added
    "eval": "c7e02d79752e5c40ee4952d418563c23b6c243e4fbb20592e52a84a331a3db87",
    "default": "f1935ae629673be175173dc73c41d850a167f7538f92d9d95004fa1c789decde",
    "full": "b367351f93e6acaf3128a458030ce5597d87007cd383624eecc401e2d600d0eb",
}


def test_rgb_path_bitwise_as_before(tmp_path):
    """Synthetic default data through build_index and the RGB DetectionDataset: tensors, boxes and labels hash to
    what the loader gave before RGB+X and reduced decoding (no reduction applies at 128-192 px to 160/256)."""
    splits = generate(tmp_path / "raw", SyntheticParams(train_images=20, val_images=5), seed=0)
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "synthetic", "splits": splits}))
    build_index(tmp_path / "manifest.json", IndexParams(), tmp_path / "index")
    split = load_split(tmp_path / "index", "train")
    model = ModelParams(min_size=160, max_size=256)
    augments = {"eval": None, "default": AugmentParams(),
                "full": AugmentParams(hflip=0.5, color_jitter=0.5, multi_scale=[96, 128, 160])}
    for name, aug in augments.items():
        ds = DetectionDataset(split, build_transform(model, aug, seed=3))
        h = hashlib.sha256()
        for epoch in (0, 1):
            for i in range(len(ds)):
                assert ds.transform.reduction(split.images[i].height, split.images[i].width, epoch, i) == 1
                img, t = ds[(i, epoch)]
                h.update(img.numpy().tobytes())
                h.update(t["boxes"].numpy().tobytes())
                h.update(t["labels"].numpy().tobytes())
        assert h.hexdigest() == PINNED[name], name


def _coco_jpegs(tmp: Path, n: int = 6) -> Path:
    """n 640x480 JPEGs with many boxes (tiny, thin, touching the borders) indexed; the index dir."""
    img_dir = tmp / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 2, "name": "a"}, {"id": 9, "name": "b"}]}
    for i in range(n):
        img = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(img_dir / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        coco["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for k in range(40):
            x, y = float(rng.uniform(0, 630)), float(rng.uniform(0, 470))
            w, h = float(rng.uniform(1.05, 200)), float(rng.uniform(1.05, 200))
            w, h = min(w, 640 - x), min(h, 480 - y)
            coco["annotations"].append({"id": 100 * i + k + 1, "image_id": i + 1, "category_id": [2, 9][k % 2],
                                        "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    (tmp / "ann.json").write_text(json.dumps(coco))
    split = {"images": str(img_dir), "annotations": str(tmp / "ann.json")}
    (tmp / "manifest.json").write_text(json.dumps({"source": "local", "splits": {"train": split, "val": split}}))
    build_index(tmp / "manifest.json", IndexParams(min_box_size=1.0, workers=1), tmp / "index")
    return tmp / "index"


@pytest.mark.parametrize("min_size,max_size,factor", [(160, 256, 2), (96, 160, 4), (48, 64, 8)])
def test_reduced_jpeg_decoding_keeps_boxes_exact(tmp_path, min_size, max_size, factor):
    """640x480 JPEGs decoded at 1/2, 1/4, 1/8 size: the same boxes and labels, bit for bit, as the full decode,
    the same output size and flips, and pixels close to the full decode's."""
    split = load_split(_coco_jpegs(tmp_path), "train")
    model = ModelParams(min_size=min_size, max_size=max_size)
    reduced = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5), seed=1))
    full = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5), seed=1))
    full.transform.reduce_jpeg = False
    for epoch in range(2):
        for i, rec in enumerate(split.images):
            assert reduced.transform.reduction(rec.height, rec.width, epoch, i) == factor
            (a, ta), (b, tb) = reduced[(i, epoch)], full[(i, epoch)]
            assert a.shape == b.shape and ta["scale"] == tb["scale"] and len(tb["boxes"]) == 40
            torch.testing.assert_close(ta["boxes"], tb["boxes"], rtol=0, atol=0)
            assert torch.equal(ta["labels"], tb["labels"])
            assert (a - b).abs().mean() < 0.02  # the same picture (DCT scaling filters unlike bilinear)
    evaluation = DetectionDataset(split, build_transform(model, None, seed=1))
    assert evaluation.transform.reduction(480, 640) == 1  # predictions decode whole, as an exported graph does
    image, rec = evaluation[0][0], split.images[0]
    whole = cv2.cvtColor(cv2.imread(rec.file, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(whole, (image.shape[2], image.shape[1]), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_coco_photos_with_generated_aux_at_the_default_size(tmp_path):
    """Real COCO photos with a generated 16-bit aux image (the photo's gray, x 257) at 160/256 with flip and
    multi-scale: [4, H, W] items whose aux channel matches the gray of the RGB channels (same geometry)."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} is absent (the shared fixtures live beside the repository in ../shared)")
    img_dir, aux_dir = tmp_path / "train", tmp_path / "aux"
    shutil.copytree(TINY / "train2017", img_dir)
    aux_dir.mkdir()
    for p in sorted(img_dir.glob("*.jpg")):
        gray = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(aux_dir / f"{p.stem}.png"), gray.astype(np.uint16) * 257)
    split = {"images": str(img_dir), "annotations": str(TINY / "annotations/instances_train2017.json"),
             "aux": str(aux_dir)}
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "local", "splits": {"train": split, "val": split}}))
    build_index(tmp_path / "manifest.json", IndexParams(min_box_size=1.0, workers=1, aux_channels=1), tmp_path / "idx")
    split = load_split(tmp_path / "idx", "train")
    model = ModelParams(min_size=160, max_size=256, modality="rgbx")
    ds = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5, multi_scale=[128, 160]), seed=0))
    full = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5, multi_scale=[128, 160]), seed=0))
    full.transform.reduce_jpeg = False  # both from full-size pixels: the aux is the gray of the RGB to rounding
    assert len(split.images) >= 40
    for i in range(len(split.images)):
        for dataset, tolerance in ((full, 0.01), (ds, 0.05)):
            image, target = dataset[(i, 1)]
            assert image.shape[0] == 4 and max(image.shape[1:]) <= 256
            gray = image[0] * 0.299 + image[1] * 0.587 + image[2] * 0.114
            aligned = (gray - image[3]).abs().mean()
            assert aligned < tolerance and aligned < 0.5 * (gray - image[3].flip(-1)).abs().mean()


def _random_boxes(rng, h: int, w: int, k: int = 8) -> np.ndarray:
    """k valid pascal_voc boxes in an h x w image, some tiny (near albumentations' 1e-7 px^2 filter), some past
    the right/bottom edge, some integer, some with -0.0 corners, float32 or float64."""
    x0, y0 = rng.uniform(0, w - 0.01, k), rng.uniform(0, h - 0.01, k)
    tiny = rng.random() < 0.3
    dx = rng.uniform(1e-6, 1e-2, k) if tiny else rng.uniform(1e-3, w / 2, k)
    dy = rng.uniform(1e-6, 1e-2, k) if tiny else rng.uniform(1e-3, h / 2, k)
    boxes = np.stack([x0, y0, x0 + dx, y0 + dy], 1)
    if rng.random() < 0.3:
        boxes = np.floor(boxes)
        boxes[:, 2:] += 1
    if rng.random() < 0.2:
        boxes[:, :2] = -0.0
    return boxes.astype(np.float32 if rng.random() < 0.5 else np.float64)


def test_box_arithmetic_bit_for_bit_as_albumentations():
    """albu_boxes (the loader's resize and flip without albumentations) gives the boxes and labels of an
    albumentations Compose with A.Resize / A.HorizontalFlip, bit for bit (signed zeros, dropped tiny boxes),
    over random sizes and boxes."""
    import albumentations as A

    from mitdet.data.transforms import albu_boxes
    rng = np.random.default_rng(0)
    params = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_area=0.0, min_visibility=0.0)
    checked = dropped = 0
    for _ in range(600):
        h, w = int(rng.integers(2, 1400)), int(rng.integers(2, 1400))
        nh, nw = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        boxes, labels = _random_boxes(rng, h, w), np.arange(8)
        for flip in (False, True):
            shape = (nh, nw) if flip else (h, w)
            ref = A.Compose([A.HorizontalFlip(p=1.0) if flip else A.Resize(nh, nw)], bbox_params=params)
            try:
                out = ref(image=np.zeros((*shape, 1), np.uint8), bboxes=boxes, labels=labels)
            except ValueError:  # a box albumentations refuses (clipped to nothing): the index never has one
                continue
            got, got_labels = albu_boxes(boxes, labels, shape, (nh, nw), flip=flip)
            assert np.asarray(out["bboxes"], float).reshape(-1, 4).tobytes() == got.tobytes()
            assert np.array_equal(np.asarray(out["labels"]), got_labels)
            checked += 1
            dropped += len(got) < 8
    assert checked > 600 and dropped > 10


def _albumentations_transform(model, augment, seed):
    """The loader's transform as it was, all in albumentations: Resize Compose, then HorizontalFlip in a
    Compose reseeded from (seed, epoch, index); aux resized by cv2 and flipped as the `mask`."""
    import albumentations as A
    bbox = dict(format="pascal_voc", label_fields=["labels"], clip=True)
    flip = A.Compose([A.HorizontalFlip(p=augment.hflip)], seed=seed,
                     bbox_params=A.BboxParams(**bbox, min_area=0.0, min_visibility=0.0)) if augment else None
    scales = list(augment.multi_scale) if augment and augment.multi_scale else [model.min_size]

    def run(image, boxes, labels, epoch, index, aux=None):
        from mitdet.data.transforms import resized_shape
        rng = np.random.default_rng([seed, epoch, index])
        min_size = scales[int(rng.integers(len(scales)))] if len(scales) > 1 else scales[0]
        nh, nw, scale = resized_shape(*image.shape[:2], min_size, model.max_size)
        out = A.Compose([A.Resize(nh, nw)], bbox_params=A.BboxParams(**bbox))(image=image, bboxes=boxes,
                                                                              labels=labels)
        extra = {} if aux is None else {"mask": cv2.resize(aux, (nw, nh), interpolation=cv2.INTER_LINEAR)}
        if flip is not None:
            flip.set_random_seed(int(rng.integers(2**31 - 1)))
            out = flip(image=out["image"], bboxes=out["bboxes"], labels=out["labels"], **extra)
        else:
            out.update(extra)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clip(0, nw), boxes[:, 1::2].clip(0, nh)
        mask = out.get("mask")
        return out["image"], boxes, np.asarray(out["labels"], np.int64), scale, mask
    return run


@pytest.mark.parametrize("hflip", [0.0, 0.5, 1.0])
def test_transform_bit_for_bit_as_the_albumentations_pipeline(hflip):
    """The transform without albumentations (cv2 resize, a flipped view, albu_boxes) gives the image, boxes,
    labels, scale and aux of the all-albumentations pipeline it replaces, bit for bit, with the same flips for
    the same (seed, epoch, index): random sizes, boxes, multi-scale, 16-bit aux."""
    rng = np.random.default_rng(int(hflip * 10))
    flips = 0
    for case in range(60):
        h, w = int(rng.integers(16, 700)), int(rng.integers(16, 700))
        model = ModelParams(min_size=int(rng.integers(32, 400)), max_size=700)
        augment = AugmentParams(hflip=hflip, multi_scale=[48, 96, 160] if case % 3 == 0 else []) if hflip else None
        ours, ref = build_transform(model, augment, seed=case), _albumentations_transform(model, augment, case)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        aux = rng.integers(0, 65536, (h, w, 2), dtype=np.uint16) if case % 2 else None
        boxes, labels = _random_boxes(rng, h, w), rng.integers(1, 9, 8)
        for epoch, index in ((0, case), (2, 3 * case + 1)):
            try:
                expected = ref(image, boxes, labels, epoch, index, aux)
            except ValueError:
                continue
            got = ours(image, boxes, labels, epoch, index, **({} if aux is None else {"aux": aux}))
            assert np.array_equal(got[0], expected[0])
            assert got[1].dtype == np.float32 and got[1].tobytes() == expected[1].tobytes()
            assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
            if aux is not None:
                assert got[4].dtype == np.uint16 and np.array_equal(got[4], expected[4])
            flips += not np.array_equal(got[0], cv2.resize(image, got[0].shape[1::-1]))
    assert (flips == 0) if hflip == 0 else (flips > 10)


def test_rgb_decode_flags_bitwise_as_bgr_and_cvtcolor(tmp_path):
    """Decoding straight to RGB (full and 1/2, 1/4, 1/8 JPEG, PNG) gives the pixels of BGR + cvtColor."""
    from mitdet.data.decode import REDUCED_FLAGS, REDUCED_RGB_FLAGS, decode_image
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (333, 251), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    for name in ("a.jpg", "b.png"):
        cv2.imwrite(str(tmp_path / name), image)
        expected = cv2.cvtColor(cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        got, why = decode_image(str(tmp_path / name), 333, 251)
        assert why == "" and np.array_equal(got, expected)
    data = np.fromfile(tmp_path / "a.jpg", np.uint8)
    for f in (2, 4, 8):
        expected = cv2.cvtColor(cv2.imdecode(data, REDUCED_FLAGS[f]), cv2.COLOR_BGR2RGB)
        assert np.array_equal(cv2.imdecode(data, REDUCED_RGB_FLAGS[f]), expected)
        assert np.array_equal(decode_image(str(tmp_path / "a.jpg"), 333, 251, f)[0], expected)
