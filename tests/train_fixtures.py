"""A tiny synthetic detection index (real JPEGs, real COCO JSON) written per the index contract, for train tests."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np

from mitdet.params import ModelParams, RoiParams, RpnParams, TrainParams

CATEGORIES = [{"id": 3, "name": "square", "label": 1}, {"id": 7, "name": "disc", "label": 2}]


def _image(rng: np.random.Generator, size: int):
    """A noisy background with 1-2 large bright shapes; returns (BGR image, [(xywh, category id)])."""
    img = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        side = int(rng.integers(size // 4, size // 2))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        cat = CATEGORIES[int(rng.integers(0, 2))]
        if cat["name"] == "square":
            cv2.rectangle(img, (x, y), (x + side - 1, y + side - 1), (40, 40, 230), -1)
        else:
            cv2.circle(img, (x + side // 2, y + side // 2), side // 2, (230, 200, 40), -1)
        objects.append(([float(x), float(y), float(side), float(side)], cat))
    return img, objects


def write_index(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """data/index/{train,val}.jsonl, categories.json, instances_{train,val}.json under `root`; returns the dir."""
    rng = np.random.default_rng(seed)
    index = root / "data" / "index"
    images_dir = root / "data" / "images"
    index.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    (index / "categories.json").write_text(json.dumps(CATEGORIES))
    image_id, ann_id = 1, 1
    for split, n in (("train", n_train), ("val", n_val)):
        lines, coco = [], {"images": [], "annotations": [], "categories": [
            {"id": c["id"], "name": c["name"]} for c in CATEGORIES]}
        for _ in range(n):
            img, objects = _image(rng, size)
            file = images_dir / f"{split}_{image_id:04d}.jpg"
            cv2.imwrite(str(file), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            rec = {"image_id": image_id, "file": str(file), "width": size, "height": size, "boxes": [],
                   "category_ids": [], "labels": [], "iscrowd": [], "ann_ids": []}
            coco["images"].append({"id": image_id, "file_name": file.name, "width": size, "height": size})
            for box, cat in objects:
                rec["boxes"].append(box)
                rec["category_ids"].append(cat["id"])
                rec["labels"].append(cat["label"])
                rec["iscrowd"].append(0)
                rec["ann_ids"].append(ann_id)
                coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat["id"],
                                            "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
                ann_id += 1
            lines.append(json.dumps(rec))
            image_id += 1
        (index / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        (index / f"instances_{split}.json").write_text(json.dumps(coco))
    return index


def tiny_model(size: int = 64) -> ModelParams:
    """mit_b0, 16 FPN channels, few proposals: a step takes well under a second on a CPU."""
    return ModelParams(drop_path_rate=0.1, fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128], min_size=size,
                       max_size=size, rpn=RpnParams(pre_nms_top_n_train=100, pre_nms_top_n_test=50,
                                                    post_nms_top_n_train=50, post_nms_top_n_test=30,
                                                    batch_size_per_image=32),
                       roi=RoiParams(batch_size_per_image=32, detections_per_img=20))


def tiny_train(**overrides) -> TrainParams:
    """Short, CPU-only, no validation unless asked for; every checkpoint/log path still exercised."""
    base = TrainParams(epochs=2, batch_size=2, lr=1e-3, warmup_steps=2, device="cpu", num_workers=0, threads=1,
                       log_every_steps=2, checkpoint=dataclasses.replace(TrainParams().checkpoint, every_steps=3),
                       quick_eval=dataclasses.replace(TrainParams().quick_eval, interval=0),
                       val=dataclasses.replace(TrainParams().val, interval=0))
    nested = {k: overrides.pop(k) for k in ("val", "quick_eval", "checkpoint", "early_stopping", "augment")
              if k in overrides}
    base = dataclasses.replace(base, **overrides)
    for key, values in nested.items():
        base = dataclasses.replace(base, **{key: dataclasses.replace(getattr(base, key), **values)})
    return base
