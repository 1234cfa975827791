"""Inference over a split: COCO results in original pixels, and batch-1 speed.

`predict` and `measure_speed` work on any torchvision detector; training validates with `predict` too.
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

from mitdet.engine.device import backbone_autocast, synchronize


def to_coco_results(output: dict, target: dict, input_hw: tuple[int, int],
                    label_to_category: dict[int, int]) -> list[dict]:
    """One image's detections -> COCO results in the ORIGINAL image's pixels (xywh, clipped to the image)."""
    orig_h, orig_w = (int(v) for v in target["orig_size"])
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    scale = float(target["scale"])
    if abs(in_h - orig_h * scale) <= 1.0 and abs(in_w - orig_w * scale) <= 1.0:
        sx, sy = orig_w / in_w, orig_h / in_h  # exact per-axis ratio of the resize (rounding of each side)
    else:  # the input was padded or cropped beyond the resize: only the scale is known
        sx = sy = 1.0 / scale
    boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    scores = output["scores"].detach().float().cpu().numpy().reshape(-1)
    labels = output["labels"].detach().cpu().numpy().reshape(-1)
    if boxes.size == 0:
        return []
    boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float64)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, orig_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, orig_h)
    image_id = int(target["image_id"])
    out = []
    for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=False):
        try:
            cat = label_to_category[int(lab)]
        except KeyError:
            raise ValueError(f"the model predicted label {int(lab)}, which its categories do not map "
                             f"(labels {sorted(label_to_category)}); model.json and the weights disagree") from None
        out.append({"image_id": image_id, "category_id": int(cat),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(s), 5)})
    return out


def forward_by_shape(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """The model's outputs for `images`, in their order, run in groups of one shape: a batch of mixed sizes is
    padded to its largest, and MiT's attention sees the padding, so an image's detections would depend on
    which images share its batch."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    outputs: list[dict | None] = [None] * len(images)
    for indices in groups.values():
        for i, out in zip(indices, model([images[i] for i in indices]), strict=True):
            outputs[i] = out
    return outputs


def predict(model: torch.nn.Module, loader: Iterable, device: str | torch.device,
            label_to_category: dict[int, int], amp: str = "off", progress: bool = True) -> tuple[list[dict], dict]:
    """Run `model` over `loader` (batches of (images, targets, skipped)); return (COCO results, stats).

    stats: images (run through the model), seconds, skipped (failed to decode), detections, image_ids (the
    images predicted, to pass to `score(image_ids=...)`).
    """
    from tqdm import tqdm  # not tqdm.auto: its asyncio variant iterates the loader twice

    device = torch.device(device) if not isinstance(device, torch.device) else device
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    skipped = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    start = time.perf_counter()
    with torch.inference_mode(), backbone_autocast(model, device, amp):
        for images, targets, batch_skipped in tqdm(loader, total=total, desc="predict", unit="batch",
                                                   disable=not progress, leave=False):
            skipped += int(batch_skipped)
            if not images:
                continue
            outputs = forward_by_shape(model, [im.to(device, non_blocking=True) for im in images])
            for image, target, output in zip(images, targets, outputs, strict=False):
                results += to_coco_results(output, target, tuple(image.shape[-2:]), label_to_category)
                image_ids.append(int(target["image_id"]))
    synchronize(device)
    stats = {"images": len(image_ids), "seconds": time.perf_counter() - start, "skipped": skipped,
             "detections": len(results), "image_ids": image_ids}
    return results, stats


def measure_speed(model: torch.nn.Module, images: list[torch.Tensor], device: str | torch.device,
                  warmup: int, iters: int, amp: str = "off") -> dict[str, float | None]:
    """Batch-1 latency of `model` over `iters` passes (cycling through `images`) after `warmup` passes.

    Images are on the device before timing: this is the model's time, not the loader's. None when iters is 0.
    """
    if iters <= 0 or not images:
        return {"images_per_s": None, "ms_per_image": None}
    device = torch.device(device) if not isinstance(device, torch.device) else device
    model.eval()
    inputs = [im.to(device) for im in images]
    with torch.inference_mode(), backbone_autocast(model, device, amp):
        for i in range(warmup):
            model([inputs[i % len(inputs)]])
        synchronize(device)
        start = time.perf_counter()
        for i in range(iters):
            model([inputs[i % len(inputs)]])
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"images_per_s": iters / seconds, "ms_per_image": 1000.0 * seconds / iters}
