"""Benchmark: header validation (build_index) against full decoding with cv2.imread, in one run.

Builds, in a temporary folder, a COCO-format index of N small real JPEG files (copies of a few encoded JPEGs of
varied sizes), warms the file cache, then measures with the same number of processes:
  1. header validation images/s over all N files (mitdet.data.headers via the index's process pool),
  2. the whole build_index stage images/s (JSON parse, validation, outputs) on the same N files,
  3. cv2.imread decode images/s on COCO-sized photos (the shared fixtures, else generated 640x480 JPEGs),
  4. header validation images/s on those same photos,
and prints the figures and ratios. Usage: .venv/bin/python bench/bench_index.py [--images 120000] [--workers 2]

With --coco-shaped the annotations look like COCO train2017's (about 7.85 per image, polygon segmentations, float
boxes and areas, 1% crowd regions with RLE counts, COCO's image-entry fields: 100k images give ~785k annotations
and a ~400 MB JSON), and --stage-only times the build_index stage alone (no header/decode comparison).
--make-only DIR writes the dataset (manifest.json in DIR) and stops; --stage-on DIR then times the stage on it
(run it under /usr/bin/time -v for the peak memory).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mitdet.data.headers import probe_many
from mitdet.data.build_index import build_index
from mitdet.params import IndexParams

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _sources(n_kinds: int = 12) -> list[tuple[bytes, int, int]]:
    """A few real encoded JPEGs of varied sizes and content (textured, as photos are)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_kinds):
        w, h = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        base = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out.append((cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes(), w, h))
    return out


def _coco_annotations(rng, image_id: int, w: int, h: int, first_id: int) -> list[dict]:
    """COCO-train-shaped annotations of one image: ~7.85 on average (geometric-ish), polygons of 8-40 points."""
    out = []
    for k in range(int(rng.geometric(1 / 7.85)) - (1 if rng.random() < 0.01 else 0)):
        bw, bh = round(float(rng.uniform(1, w * 0.9)), 2), round(float(rng.uniform(1, h * 0.9)), 2)
        x, y = round(float(rng.uniform(0, w - bw)), 2), round(float(rng.uniform(0, h - bh)), 2)
        crowd = int(rng.random() < 0.01)
        if crowd:
            seg = {"counts": [int(c) for c in rng.integers(0, 400, int(rng.integers(20, 200)))], "size": [h, w]}
        else:
            pts = rng.uniform(0, 1, (int(rng.integers(8, 41)), 2)) * (bw, bh) + (x, y)
            seg = [[round(float(v), 2) for v in pts.ravel()]]
        out.append({"segmentation": seg, "area": round(float(bw * bh * rng.uniform(0.3, 0.9)), 4), "iscrowd": crowd,
                    "image_id": image_id, "bbox": [x, y, bw, bh], "category_id": int(rng.integers(1, 81)),
                    "id": first_id + k})
    return out


def _make_index(root: Path, n: int, coco_shaped: bool = False) -> Path:
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    sources = _sources()
    rng = np.random.default_rng(2)
    images, anns = [], []
    for i in range(n):
        data, w, h = sources[i % len(sources)]
        name = f"{i:012d}.jpg"
        with open(img_dir / name, "wb") as f:  # a copy, not a link: every file has its own inode and cache pages
            f.write(data)
        if coco_shaped:
            images.append({"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/"
                           f"{name}", "height": h, "width": w, "date_captured": "2013-11-14 16:28:13",
                           "flickr_url": f"http://farm4.staticflickr.com/3153/{i}_e1d3a8d4f3_z.jpg", "id": i + 1})
            anns.extend(_coco_annotations(rng, i + 1, w, h, len(anns) + 1))
        else:
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, w / 2, h / 2], "iscrowd": 0})
    cats = ([{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in range(1, 81)] if coco_shaped
            else [{"id": 1, "name": "thing"}])
    coco = {"info": {"description": "bench"}, "licenses": [], "images": images, "annotations": anns,
            "categories": cats}
    (root / "train.json").write_text(json.dumps(coco))
    (root / "val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    manifest = {"source": "local", "splits": {s: {"images": str(img_dir), "annotations": str(root / f"{s}.json")}
                                              for s in ("train", "val")}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def _decode_many(paths: list[str]) -> int:
    cv2.setNumThreads(1)
    return sum(cv2.imread(p, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) is not None for p in paths)


def _parallel(fn, paths: list[str], pool, workers: int) -> float:
    """Seconds to run fn over paths split into large chunks across the pool."""
    chunk = max(1, -(-len(paths) // (workers * 4)))
    t0 = time.perf_counter()
    pool.map(fn, [paths[i:i + chunk] for i in range(0, len(paths), chunk)])
    return time.perf_counter() - t0


def _coco_sized(tmp: Path, n: int) -> list[str]:
    photos = sorted(str(p) for p in FIXTURES.glob("*/*2017/*.jpg"))
    if photos:
        return photos
    rng = np.random.default_rng(1)  # fallback: textured 640x480 JPEGs
    out = []
    for i in range(n):
        base = cv2.resize(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_CUBIC)
        p = tmp / f"coco_{i}.jpg"
        cv2.imwrite(str(p), np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))
        out.append(str(p))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120_000, help="files in the benchmark index")
    ap.add_argument("--workers", type=int, default=2, help="processes (index.workers)")
    ap.add_argument("--decode-repeats", type=int, default=2, help="passes of cv2.imread over the COCO-sized sample")
    ap.add_argument("--dir", default=None, help="where to build the temporary index (default: the system temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--coco-shaped", action="store_true", help="COCO-train-shaped annotations (~7.85 per image)")
    ap.add_argument("--stage-only", action="store_true", help="time the build_index stage only")
    ap.add_argument("--make-only", default=None, metavar="DIR", help="write the dataset to DIR and stop")
    ap.add_argument("--stage-on", default=None, metavar="DIR", help="time build_index on DIR (from --make-only)")
    args = ap.parse_args(argv)
    if args.stage_on:
        out = Path(tempfile.mkdtemp(prefix="mitdet-bench-index-", dir=args.dir))
        try:
            t0 = time.perf_counter()
            metrics = build_index(Path(args.stage_on) / "manifest.json", IndexParams(workers=args.workers), out)
            stage_s = time.perf_counter() - t0
        finally:
            shutil.rmtree(out, ignore_errors=True)
        m, size = metrics["splits"]["train"], (Path(args.stage_on) / "train.json").stat().st_size
        print(f"build_index stage : {m['images'] / stage_s:>9,.0f} images/s  ({stage_s:.2f} s; {m['annotations']} "
              f"annotations, train.json {size / 1e6:.1f} MB, {args.workers} processes)")
        return 0
    if args.make_only:
        manifest = _make_index(Path(args.make_only), args.images, args.coco_shaped)
        size = (Path(args.make_only) / "train.json").stat().st_size
        print(f"wrote {manifest} ({args.images} images, train.json {size / 1e6:.1f} MB)")
        return 0
    if args.stage_only:
        tmp = Path(tempfile.mkdtemp(prefix="mitdet-bench-index-", dir=args.dir))
        try:
            manifest = _make_index(tmp, args.images, args.coco_shaped)
            size = (tmp / "train.json").stat().st_size
            t0 = time.perf_counter()
            metrics = build_index(manifest, IndexParams(workers=args.workers), tmp / "index")
            stage_s = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        m = metrics["splits"]["train"]
        print(f"build_index stage : {args.images / stage_s:>9,.0f} images/s  ({stage_s:.2f} s; {m['annotations']} "
              f"annotations, train.json {size / 1e6:.1f} MB, {args.workers} processes)")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="mitdet-bench-index-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        manifest = _make_index(tmp, args.images, args.coco_shaped)
        print(f"made {args.images} JPEG files + COCO JSON in {tmp} ({time.perf_counter() - t0:.1f} s)", flush=True)
        paths = [str(p) for p in sorted((tmp / "images").iterdir())]
        coco_paths = _coco_sized(tmp, 200)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.workers) as pool:
            _parallel(probe_many, paths, pool, args.workers)  # warm the file cache (and the pool)
            _parallel(_decode_many, coco_paths, pool, args.workers)
            header_s = min(_parallel(probe_many, paths, pool, args.workers) for _ in range(3))
            decode_s = _parallel(_decode_many, coco_paths * args.decode_repeats, pool, args.workers)
            coco_header_s = min(_parallel(probe_many, coco_paths * 20, pool, args.workers) for _ in range(3))
        t0 = time.perf_counter()
        metrics = build_index(manifest, IndexParams(workers=args.workers), tmp / "index")
        stage_s = time.perf_counter() - t0
        assert metrics["splits"]["train"]["images_kept"] == args.images, metrics["splits"]["train"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sizes = [cv2.imread(p).shape[:2] for p in coco_paths[:5]]
    res = {
        "images": args.images, "workers": args.workers, "cpu_count": os.cpu_count(),
        "header_images_per_s": round(args.images / header_s),
        "build_index_images_per_s": round(args.images / stage_s), "build_index_seconds": round(stage_s, 2),
        "decode_sample": len(coco_paths) * args.decode_repeats, "decode_sizes_example": sizes,
        "decode_images_per_s": round(len(coco_paths) * args.decode_repeats / decode_s, 1),
        "header_images_per_s_same_photos": round(len(coco_paths) * 20 / coco_header_s),
    }
    res["ratio_header_vs_decode"] = round(res["header_images_per_s"] / res["decode_images_per_s"], 1)
    res["ratio_same_photos"] = round(res["header_images_per_s_same_photos"] / res["decode_images_per_s"], 1)
    print(f"header validation : {res['header_images_per_s']:>9,} images/s  ({args.images} files, warm cache, "
          f"{args.workers} processes)")
    print(f"build_index stage : {res['build_index_images_per_s']:>9,} images/s  ({stage_s:.2f} s end to end: JSON, "
          f"validation, outputs)")
    print(f"cv2.imread decode : {res['decode_images_per_s']:>9,} images/s  ({res['decode_sample']} COCO-sized photos, "
          f"e.g. {sizes[0][1]}x{sizes[0][0]}, {args.workers} processes)")
    print(f"header on the same photos: {res['header_images_per_s_same_photos']:,} images/s")
    print(f"ratio header/decode: {res['ratio_header_vs_decode']}x (same photos: {res['ratio_same_photos']}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
