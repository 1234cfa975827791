"""The embedded default dataset: deterministic coloured shapes on textured backgrounds, in COCO format.

Each class pairs a distinct shape with a distinct colour, strong cues that a randomly initialised network learns
within a few hundred CPU steps; grayscale images keep the shape cue. Objects are mostly medium and large, and
images are small (sides of 128-192 px by default, trained at a 160 px shorter side).

Why not fine textures: from random initialisation on the CPU, MiT-b0 + FPN + Faster R-CNN on classes that
differed only by fill texture (solid vs striped) at 256 px reached AP50 0.01 after about 180 steps (6 minutes);
learning took off only after about 600 steps (AP50 0.126 after 30 minutes). The default run gives mit_b0
600 steps in all, so its classes must be learnable within a few hundred.

Same seed and params -> byte-identical JPEG files and JSON.

Thermal (`data.synthetic.aux: thermal`): each image also gets an aligned 1-channel 16-bit PNG in
`<split>_aux/<stem>.png`. Three classes (circle, square, star) become warm/cold twins: each such object is drawn
warm or cold at random, and its category becomes `<name>_warm` (the class's own id) or `<name>_cold` (an id of its
own). The twins look exactly alike in RGB: the JPEGs are byte-identical to the `aux: none` ones, because the
thermal image and the warm/cold draws come from their own generator (seeded by image and a stream code), so the
RGB draws do not change; an RGB-only model can only guess which twin it sees (50%), RGB+X can read it off the
thermal image. Thermal image: a background at a random level with a linear gradient, a smooth low-frequency field
and mild pixel noise; warm objects are much brighter over their exact visible mask, cold objects and every other
class (and crowd regions) stay within a little of the background.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path

import cv2
import numpy as np

from mitdet.io import write_text
from mitdet.params import SyntheticParams

# COCO-like non-contiguous ids, so the id -> label mapping is exercised. Colours are BGR.
CATEGORIES = [
    {"id": 1, "name": "circle", "color": (40, 40, 220)},      # red
    {"id": 3, "name": "square", "color": (50, 190, 40)},      # green
    {"id": 5, "name": "triangle", "color": (220, 90, 30)},    # blue
    {"id": 8, "name": "cross", "color": (30, 220, 230)},      # yellow
    {"id": 13, "name": "diamond", "color": (210, 40, 210)},   # magenta
    {"id": 21, "name": "ring", "color": (230, 220, 40)},      # cyan
    {"id": 34, "name": "star", "color": (20, 130, 250)},      # orange
    {"id": 55, "name": "bar", "color": (150, 30, 110)},       # purple
]
SPLIT_CODES = {"train": 1, "val": 2}
THERMAL_STREAM = 7  # the thermal generator's seed: [seed, split code, image, THERMAL_STREAM]
# thermal twins: class name -> the id of its `_cold` twin (its `_warm` twin keeps the class's own id)
TWINS = {"circle": 61, "square": 77, "star": 90}
VAL_ID_OFFSET = 1_000_000  # image ids never repeat across splits
# processes making the images (`generate`): in-process on 1-3 cores, where measured on 2 shared cores a second
# process gained nothing (800 images: 6.3-6.8 s with one, 6.3-7.6 s with two), else up to 4
GENERATE_WORKERS = min(4, os.cpu_count() or 1) if (os.cpu_count() or 1) >= 4 else 1
GENERATE_CHUNK = 50   # images per unit of work
INLINE_BELOW = 200    # fewer images than this are made in-process: starting a pool costs more than it saves


def generate(out_dir: str | Path, params: SyntheticParams, seed: int, workers: int | None = None) -> dict[str, dict[str, str]]:
    """Write `out_dir/{train,val}/*.jpg` (with aux thermal: `out_dir/{split}_aux/*.png` too) and
    `out_dir/annotations/instances_{split}.json`; return the splits.

    Images are made by `workers` processes (default GENERATE_WORKERS; in-process under INLINE_BELOW images) over
    chunks of image numbers: each image has its own generator seeded by [seed, split, i], and the annotations are
    numbered here in image order, so the files are byte-identical whatever the number of processes."""
    out_dir = Path(out_dir)
    thermal = params.aux == "thermal"
    workers = GENERATE_WORKERS if workers is None else max(1, workers)
    total = params.train_images + params.val_images
    pool = None
    if workers > 1 and total >= INLINE_BELOW:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
    splits = {}
    try:
        for split, count in (("train", params.train_images), ("val", params.val_images)):
            img_dir, aux_dir = out_dir / split, out_dir / f"{split}_aux"
            img_dir.mkdir(parents=True, exist_ok=True)
            if thermal:
                aux_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(str(out_dir), params, seed, split, i, min(i + GENERATE_CHUNK, count))
                    for i in range(0, count, GENERATE_CHUNK)]
            made = pool.imap(_make_chunk, jobs) if pool is not None else map(_make_chunk, jobs)
            images, annotations = [], []
            for chunk in made:
                for image, objects in chunk:
                    images.append(image)
                    for obj in objects:
                        x, y, bw, bh = obj["bbox"]
                        annotations.append({
                            "id": len(annotations) + 1 + (VAL_ID_OFFSET if split == "val" else 0),
                            "image_id": image["id"], "category_id": obj["category_id"], "bbox": [x, y, bw, bh],
                            "area": obj["area"], "iscrowd": obj["iscrowd"],
                            "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                        })
            coco = {
                "info": {"description": f"mitdet synthetic shapes ({split}, seed {seed})", "version": "1"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c["id"], "name": c["name"], "supercategory": "shape"}
                               for c in categories(params)],
            }
            ann_path = out_dir / "annotations" / f"instances_{split}.json"
            write_text(ann_path, json.dumps(coco, separators=(",", ":")) + "\n")
            splits[split] = {"images": str(img_dir), "annotations": str(ann_path)}
            if thermal:
                splits[split]["aux"] = str(aux_dir)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return splits


def _make_chunk(job: tuple) -> list[tuple[dict, list[dict]]]:
    """Images [start, stop) of one split: written to disk; returns each one's (image entry, visible objects).

    Plain writes, not `write_bytes`: its atomic rename, fsyncs and scan of the folder for stale temporaries cost
    more than making the image, and the scan grows with the folder (quadratic over a split). The files land in a
    folder of their own that prepare_data swaps in whole once everything is written."""
    out_dir, params, seed, split, start, stop = job
    out_dir = Path(out_dir)
    img_dir, aux_dir = out_dir / split, out_dir / f"{split}_aux"
    out = []
    for i in range(start, stop):
        image_id = i + 1 + (VAL_ID_OFFSET if split == "val" else 0)
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        pixels, objects, owner = _compose(rng, params)
        name = f"{image_id:012d}.jpg"
        (img_dir / name).write_bytes(_encode(name, ".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality]))
        if params.aux == "thermal":
            heat = make_thermal(np.random.default_rng([seed, SPLIT_CODES[split], i, THERMAL_STREAM]), objects, owner)
            (aux_dir / f"{image_id:012d}.png").write_bytes(_encode(name, ".png", heat, []))
        h, w = pixels.shape[:2]
        out.append(({"id": image_id, "file_name": name, "width": w, "height": h},
                    [o for o in objects if o["area"] > 0]))
    return out


def categories(params: SyntheticParams) -> list[dict]:
    """The dataset's categories: CATEGORIES, with thermal each twin class as `<name>_warm`, plus the `_cold` twins."""
    if params.aux != "thermal":
        return CATEGORIES
    warm = [{**c, "name": f"{c['name']}_warm"} if c["name"] in TWINS else c for c in CATEGORIES]
    cold = [{**c, "id": TWINS[c["name"]], "name": f"{c['name']}_cold"} for c in CATEGORIES if c["name"] in TWINS]
    return warm + cold


def _encode(name: str, ext: str, pixels: np.ndarray, flags: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, pixels, flags)
    if not ok:
        raise RuntimeError(f"cv2.imencode({ext}) failed for synthetic image {name}")
    return buf.tobytes()


def make_image(rng: np.random.Generator, params: SyntheticParams) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HxWx3 BGR, or HxW when grayscale) and its objects (bbox xywh, category_id, area, iscrowd)."""
    img, objects, _ = _compose(rng, params)
    return img, [o for o in objects if o["area"] > 0]


def _compose(rng: np.random.Generator, params: SyntheticParams) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """`make_image`'s image and all its objects (object k owns the pixels where the returned map is k, 1-based;
    crowd -1), before the objects left with no visible pixel are dropped."""
    w = int(rng.integers(params.min_side, params.max_side + 1))
    h = int(rng.integers(params.min_side, params.max_side + 1))
    img = _background(rng, h, w)
    owner = np.zeros((h, w), np.int16)  # which object (1-based) is visible at each pixel
    objects: list[dict] = []
    if rng.random() >= params.empty_fraction:
        if rng.random() < params.crowd_fraction:
            _draw_crowd(rng, img, owner, objects)
        n = int(rng.integers(1, params.max_objects + 1))
        # larger objects first, so smaller ones land on top and occlude them only partly
        for side in sorted((_object_side(rng, h, w) for _ in range(n)), reverse=True):
            _place_object(rng, img, owner, objects, side)
    img = _add_noise(rng, img)
    for k, obj in enumerate(objects, start=1):  # COCO area: the visible pixels of the object
        if not obj["iscrowd"]:
            obj["area"] = float(np.count_nonzero(owner == k))
    if rng.random() < params.grayscale_fraction:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)  # written as a 1-channel JPEG
    return img, objects, owner


def make_thermal(rng: np.random.Generator, objects: list[dict], owner: np.ndarray) -> np.ndarray:
    """The thermal image (uint16 HxW) of one composed image; sets each twin-class object's warm or cold
    category_id (module docstring). `rng` is the image's own thermal generator."""
    h, w = owner.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-3000, 3000, 2)
    grid = rng.normal(0, 700, size=(int(rng.integers(3, 6)), int(rng.integers(3, 6)))).astype(np.float32)
    heat = (rng.uniform(18000, 26000) + gx * xs / w + gy * ys / h
            + cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC))
    names = {c["id"]: c["name"] for c in CATEGORIES}
    for k, obj in enumerate(objects, start=1):
        name = names[obj["category_id"]]
        if obj["iscrowd"] or name not in TWINS:
            continue
        warm = rng.random() < 0.5
        sel = owner == k
        heat[sel] += rng.uniform(12000, 20000) if warm else rng.normal(0, 300)
        if not warm:
            obj["category_id"] = TWINS[name]
    heat += rng.normal(0, 250, size=(h, w))
    return np.clip(np.round(heat), 0, 65535).astype(np.uint16)


def _background(rng, h, w) -> np.ndarray:
    """Low-contrast textured background: smooth colour field, faint blobs/lines; objects stand out."""
    base = rng.uniform(70, 170, size=3)
    grid = rng.normal(0, 18, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(base + field, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):  # distractor texture, muted and close to the base colour
        color = tuple(int(c) for c in np.clip(base + rng.normal(0, 22, 3), 0, 255))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, color, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            axes = (int(rng.integers(4, max(5, w // 4))), int(rng.integers(4, max(5, h // 4))))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (3, 3), 0)


def _add_noise(rng, img) -> np.ndarray:
    noise = rng.normal(0, float(rng.uniform(3, 8)), size=img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _object_side(rng, h, w) -> int:
    """Mostly medium and large objects (COCO areas: small < 32^2 <= medium < 96^2 <= large), a minority small."""
    short = min(h, w)
    r = rng.random()
    if r < 0.12:
        lo, hi = 12, 28
    elif r < 0.67:
        lo, hi = 40, 95
    else:
        lo, hi = 110, max(111, int(short * 0.98))
    hi = min(hi, int(short * 0.98))
    lo = min(lo, hi)
    return int(rng.integers(lo, hi + 1))


def _place_object(rng, img, owner, objects, side: int, attempts: int = 15) -> None:
    """Draw one object where it leaves every earlier object at least half visible (partial occlusion only)."""
    h, w = owner.shape
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    for _ in range(attempts):
        bw, bh = side, side
        if cat["name"] == "bar":  # elongated, either way: boxes of varied aspect ratios
            long, thin = side, max(6, side // 3)
            bw, bh = (long, thin) if rng.random() < 0.5 else (thin, long)
        # up to a quarter of the object may fall outside the image (clipped boxes)
        x0 = int(rng.integers(-bw // 4, w - bw + bw // 4 + 1))
        y0 = int(rng.integers(-bh // 4, h - bh + bh // 4 + 1))
        mask = np.zeros((h, w), np.uint8)
        _draw_shape(mask, cat["name"], x0, y0, bw, bh, rng)
        if not mask.any():
            continue
        covered_ok = True
        for k, obj in enumerate(objects, start=1):
            if obj["iscrowd"]:
                continue
            visible = owner == k
            n = int(np.count_nonzero(visible))
            if n and np.count_nonzero(visible & (mask > 0)) > 0.5 * n:
                covered_ok = False
                break
        if not covered_ok:
            continue
        color = np.clip(np.array(cat["color"], np.float32) + rng.normal(0, 12, 3), 0, 255)
        shade = _shading(rng, h, w, x0, y0, bw, bh)
        sel = mask > 0
        img[sel] = np.clip(color[None, :] * shade[sel][:, None], 0, 255).astype(np.uint8)
        owner[sel] = len(objects) + 1
        ys, xs = np.nonzero(sel)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "category_id": cat["id"], "iscrowd": 0, "area": 0.0})
        return


def _shading(rng, h, w, x0, y0, bw, bh) -> np.ndarray:
    """A gentle linear brightness gradient across the object (0.8..1.1), so colour is not perfectly flat."""
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    xs = (np.arange(w, dtype=np.float32) - x0) / max(bw, 1)
    ys = (np.arange(h, dtype=np.float32) - y0) / max(bh, 1)
    return np.clip(0.95 + gx * xs[None, :] + gy * ys[:, None], 0.8, 1.1)


def _draw_shape(mask, name, x0, y0, bw, bh, rng) -> None:
    cx, cy = x0 + bw / 2, y0 + bh / 2
    rx, ry = bw / 2, bh / 2

    def poly(points):
        cv2.fillPoly(mask, [np.round(np.array(points)).astype(np.int32)], 255, cv2.LINE_8)

    if name == "circle":
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (int(rx), int(ry)), 0, 0, 360, 255, -1)
    elif name == "square":
        poly([(x0, y0), (x0 + bw - 1, y0), (x0 + bw - 1, y0 + bh - 1), (x0, y0 + bh - 1)])
    elif name == "triangle":
        poly([(cx, y0), (x0 + bw - 1, y0 + bh - 1), (x0, y0 + bh - 1)])
    elif name == "cross":
        t = max(2, int(bw * 0.3))
        poly([(cx - t / 2, y0), (cx + t / 2, y0), (cx + t / 2, y0 + bh - 1), (cx - t / 2, y0 + bh - 1)])
        poly([(x0, cy - t / 2), (x0 + bw - 1, cy - t / 2), (x0 + bw - 1, cy + t / 2), (x0, cy + t / 2)])
    elif name == "diamond":
        poly([(cx, y0), (x0 + bw - 1, cy), (cx, y0 + bh - 1), (x0, cy)])
    elif name == "ring":
        center, axes = (int(round(cx)), int(round(cy))), (int(rx), int(ry))
        cv2.ellipse(mask, center, axes, 0, 0, 360, 255, -1)
        inner = (max(1, int(rx * 0.55)), max(1, int(ry * 0.55)))
        cv2.ellipse(mask, center, inner, 0, 0, 360, 0, -1)
    elif name == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        poly(np.stack([cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)], 1))
    elif name == "bar":
        poly([(x0, y0), (x0 + bw - 1, y0), (x0 + bw - 1, y0 + bh - 1), (x0, y0 + bh - 1)])
    else:
        raise ValueError(f"unknown synthetic shape {name!r}")


def _draw_crowd(rng, img, owner, objects) -> None:
    """An iscrowd region: a cluster of many tiny same-class shapes under one box, like COCO's crowd annotations."""
    h, w = owner.shape
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    rw, rh = int(rng.integers(w // 4, w // 2 + 1)), int(rng.integers(h // 4, h // 2 + 1))
    rx, ry = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
    color = np.array(cat["color"], np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(8, 16))):
        s = min(int(rng.integers(5, 10)), rw, rh)  # a 32-39 px image can give a region narrower than a shape
        _draw_shape(mask, cat["name"], int(rng.integers(rx, rx + rw - s + 1)), int(rng.integers(ry, ry + rh - s + 1)),
                    s, s, rng)
    sel = mask > 0
    img[sel] = np.clip(color + rng.normal(0, 12, 3), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(sel)
    if len(xs) == 0:
        return
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    owner[sel] = -1  # crowd pixels belong to no single object
    objects.append({"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "category_id": cat["id"],
                    "iscrowd": 1, "area": float((x2 - x1) * (y2 - y1))})
