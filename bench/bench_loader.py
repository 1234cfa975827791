"""Loader throughput: the project's DetectionDataset[i] against a plain cv2 loop and a reduced-decode cv2 loop.

500 generated 640x480 JPEGs (COCO photo size) to the default 160/256 input with a horizontal flip, one thread,
the methods interleaved round by round; prints images/s per method (best round) and the ratios as JSON.

    .venv/bin/python bench/bench_loader.py [--images 500] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mitdet.data.dataset import DetectionDataset
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split
from mitdet.data.transforms import build_transform, resized_shape
from mitdet.params import AugmentParams, IndexParams, ModelParams


def write_images(out: Path, n: int) -> Path:
    """n 640x480 photo-like JPEGs (smooth colour fields, shapes, noise; quality 90), indexed; the index dir."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(n):
        img = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_CUBIC)
        for k in range(5):
            x, y = int(rng.integers(0, 540)), int(rng.integers(0, 380))
            cv2.rectangle(img, (x, y), (x + 99, y + 99), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
            coco["annotations"].append({"id": 10 * i + k + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                        "bbox": [x, y, 100, 100], "area": 10000})
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(img_dir / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        coco["images"].append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480})
    (out / "ann.json").write_text(json.dumps(coco))
    split = {"images": str(img_dir), "annotations": str(out / "ann.json")}
    (out / "manifest.json").write_text(json.dumps({"source": "local", "splits": {"train": split, "val": split}}))
    build_index(out / "manifest.json", IndexParams(workers=1), out / "index")
    return out / "index"


def cv2_loop(records, model: ModelParams, flag: int) -> None:
    """What a plain loader does: read, BGR->RGB, resize, flip half the images, float tensor 0..1, scaled boxes."""
    rng = np.random.default_rng(0)
    for rec in records:
        img = cv2.cvtColor(cv2.imread(rec.file, flag), cv2.COLOR_BGR2RGB)
        nh, nw, _ = resized_shape(rec.height, rec.width, model.min_size, model.max_size)
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        boxes = rec.boxes * np.array([nw / rec.width, nh / rec.height] * 2, np.float32)
        if rng.random() < 0.5:
            img = img[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
        torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    model = ModelParams(min_size=160, max_size=256)
    with tempfile.TemporaryDirectory() as tmp:
        split = load_split(write_images(Path(tmp), args.images), "train")
        project = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5), seed=0))
        full = DetectionDataset(split, build_transform(model, AugmentParams(hflip=0.5), seed=0))
        full.transform.reduce_jpeg = False  # the loader as it was before reduced decoding
        methods = {
            "project": lambda: [project[(i, 0)] for i in range(len(project))],
            "project_full_decode": lambda: [full[(i, 0)] for i in range(len(full))],
            "cv2_loop": lambda: cv2_loop(split.images, model, cv2.IMREAD_COLOR),
            "cv2_reduced_loop": lambda: cv2_loop(split.images, model, cv2.IMREAD_REDUCED_COLOR_2),
        }
        best = {name: 0.0 for name in methods}
        best_cpu = {name: 0.0 for name in methods}
        for _ in range(args.rounds):
            for name, run in methods.items():  # interleaved: drifts of the machine hit every method alike
                t0, c0 = time.perf_counter(), time.thread_time()
                run()
                best[name] = max(best[name], args.images / (time.perf_counter() - t0))
                best_cpu[name] = max(best_cpu[name], args.images / (time.thread_time() - c0))
    # wall clock, and this thread's CPU time: on a shared machine the CPU time is the steadier per-core figure
    res = {f"{k}_images_per_s": round(v, 1) for k, v in best.items()}
    res.update({f"{k}_images_per_cpu_s": round(v, 1) for k, v in best_cpu.items()})
    res.update({f"ratio_{k}_vs_cv2_loop": round(v / best["cv2_loop"], 2) for k, v in best.items() if k != "cv2_loop"})
    res.update({f"cpu_ratio_{k}_vs_cv2_loop": round(v / best_cpu["cv2_loop"], 2) for k, v in best_cpu.items()
                if k != "cv2_loop"})
    res.update(images=args.images, rounds=args.rounds, input="640x480 JPEG q90", output="160/256, hflip 0.5",
               threads=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
