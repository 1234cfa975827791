"""Inference over a split: COCO results in original pixels, speed, and the evaluate_<backbone> outputs.

`predict` and `measure_speed` work on any torchvision detector; `evaluate_backbone` is what the stage calls:
load models/<b>/, predict the validation split, score it, write predictions, metrics, plots and samples.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mitdet.engine.scoring import Scores, per_class_table, score
from mitdet.io import csv_text, write_bytes, write_json, write_text
from mitdet.paths import INDEX_DIR, REJECTED_CSV, BackbonePaths

log = logging.getLogger(__name__)

EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "top10_mAP", "bottom10_mAP",
             "ap_spread", "images_per_s", "ms_per_image", "params_m", "gflops", "num_images")


# ------------------------------------------------------------------------------------------ devices
def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; a named device that is absent fails clearly."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; set the device to auto or cpu")
    return torch.device(device)


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_mode(amp: str, device: torch.device) -> str:
    """The precision actually used for `amp` (auto | bf16 | fp16 | off): bf16 | fp16 | off (off outside CUDA)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp = {amp!r}; choose one of auto, bf16, fp16, off")
    if device.type != "cuda" or amp == "off":
        if amp in _HALF:
            log.info("amp = %s ignored on %s: running in float32", amp, device.type)
        return "off"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


@contextlib.contextmanager
def backbone_autocast(model: torch.nn.Module, device: torch.device, amp: str):
    """Run only `model.backbone` (encoder + FPN, most of the compute) in half precision, in training and inference.

    Under a whole-model autocast torchvision decodes boxes in the regression head's dtype (BoxCoder casts the
    proposals to it): in bf16 a coordinate near 1000 px moves in steps of 4 px, which costs AP75. So the heads
    stay in float32 and the features are cast back to it. Nested uses (validation inside training) keep the
    outer one.
    """
    mode = amp_mode(amp, device)
    backbone = getattr(model, "backbone", None)
    if mode == "off" or backbone is None or "forward" in backbone.__dict__:  # off, or already patched
        yield
        return
    original, dtype = backbone.forward, _HALF[mode]

    def forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            out = original(*args, **kwargs)
        if isinstance(out, dict):
            return type(out)((k, v.float()) for k, v in out.items())
        return out.float() if torch.is_tensor(out) else out

    backbone.forward = forward
    try:
        yield
    finally:
        del backbone.forward  # back to the class's forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ predict
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
    for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        try:
            cat = label_to_category[int(lab)]
        except KeyError:
            raise ValueError(f"the model predicted label {int(lab)}, which its categories do not map "
                             f"(labels {sorted(label_to_category)}); model.json and the weights disagree") from None
        out.append({"image_id": image_id, "category_id": int(cat),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(s), 5)})
    return out


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
            inputs = [im.to(device, non_blocking=True) for im in images]
            outputs = model(inputs)
            for image, target, output in zip(images, targets, outputs):
                results += to_coco_results(output, target, tuple(image.shape[-2:]), label_to_category)
                image_ids.append(int(target["image_id"]))
    _sync(device)
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
        _sync(device)
        start = time.perf_counter()
        for i in range(iters):
            model([inputs[i % len(inputs)]])
        _sync(device)
        seconds = time.perf_counter() - start
    return {"images_per_s": iters / seconds, "ms_per_image": 1000.0 * seconds / iters}


# ------------------------------------------------------------------------------------------ outputs
def per_class_ap_csv(scores: Scores) -> str:
    """class, AP, AP50 for the classes with GT, best first (a bar chart in dvc plots)."""
    rows = [(n, r["AP"], r["AP50"]) for n, r in scores.per_class.items() if r["AP"] is not None]
    rows.sort(key=lambda r: (-r[1], r[0]))
    return csv_text(["class", "AP", "AP50"], rows)


def pr_curve_csv(scores: Scores) -> str:
    """recall, precision_iou50, precision_iou75 (COCOeval's 101 recall points), one column per IoU.

    Wide rather than long: DVC's line template sorts by x within a file, so two curves in one column would draw as
    one saw-tooth line.
    """
    by_recall: dict[float, dict[float, Any]] = {}
    for r in scores.pr_curves:
        by_recall.setdefault(r["recall"], {})[round(float(r["iou"]), 2)] = r["precision"]
    rows = ((rec, v.get(0.5), v.get(0.75)) for rec, v in sorted(by_recall.items()))
    return csv_text(["recall", "precision_iou50", "precision_iou75"], rows)


def eval_metrics(scores: Scores, speed: dict, params_m: float | None, gflops: float | None,
                 num_images: int) -> dict[str, Any]:
    """The eval.json dict: the summary, the aggregates, speed and size, in EVAL_KEYS order."""
    values = {**scores.summary, **scores.aggregates, **speed, "params_m": params_m, "gflops": gflops,
              "num_images": num_images}
    return {k: values.get(k) for k in EVAL_KEYS}


def images_left_out_by_index(rejected_csv: str | Path, split: str = "val") -> int | None:
    """How many images of `split` build_index rejected: its image-level rows (empty `ann_id`) in rejected.csv.

    None when the file is absent (an index built elsewhere).
    """
    path = Path(rejected_csv)
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if row.get("split") == split and not row.get("ann_id"))


# ------------------------------------------------------------------------------------------ samples
_GT_COLOUR = (60, 200, 60)       # BGR green
_CROWD_COLOUR = (160, 160, 160)  # grey: crowd regions are ignored by COCO, drawn for context
_PRED_COLOUR = (30, 30, 220)     # BGR red


def _label(img: np.ndarray, text: str, x: int, y: int, colour, font_scale: float, below: bool = False) -> None:
    """A filled label whose bottom edge is at y (or, `below`, whose top edge is at y), kept inside the image."""
    import cv2
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    while tw > img.shape[1] - 2 and font_scale > 0.3:  # too wide for the picture: smaller type
        font_scale *= 0.9
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    if below:
        y = y + th + base + 3 if y + th + base + 3 <= img.shape[0] else y - 3
    y = max(y, th + base + 1)
    x = min(max(x, 0), max(img.shape[1] - tw - 2, 0))
    cv2.rectangle(img, (x, y - th - base - 1), (x + tw + 2, y), colour, -1)
    luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]
    ink = (0, 0, 0) if luma > 120 else (255, 255, 255)  # dark text on light label backgrounds
    cv2.putText(img, text, (x + 1, y - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink, 1, cv2.LINE_AA)


def draw_sample(image_bgr: np.ndarray, gt: list[tuple[list[float], str, bool]],
                preds: list[tuple[list[float], str, float]], pred_note: str = "") -> np.ndarray:
    """The image (resized for readable labels) with GT boxes (green; crowd grey) and predictions (red, score).

    Boxes are xyxy in the image's own pixels.
    """
    import cv2
    h, w = image_bgr.shape[:2]
    f = min(max(1.0, 480.0 / min(h, w)), 1024.0 / max(h, w))  # small images up, large ones down
    img = cv2.resize(image_bgr, (round(w * f), round(h * f)), interpolation=cv2.INTER_LINEAR) if f != 1 else image_bgr.copy()
    fs = max(0.4, min(img.shape[:2]) / 1000.0)
    for box, name, crowd in gt:
        x1, y1, x2, y2 = (int(round(v * f)) for v in box)
        colour = _CROWD_COLOUR if crowd else _GT_COLOUR
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2)
        _label(img, f"GT {name}{' (crowd)' if crowd else ''}", x1, y2, colour, fs, below=True)
    for box, name, s in preds:
        x1, y1, x2, y2 = (int(round(v * f)) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), _PRED_COLOUR, 2)
        _label(img, f"{name} {s:.2f}", x1, y1, _PRED_COLOUR, fs)
    # the legend goes on a strip below the picture, where it hides no box
    strip = int(30 * fs / 0.4)
    img = cv2.copyMakeBorder(img, 0, strip, 0, 0, cv2.BORDER_CONSTANT, value=(40, 40, 40))
    _label(img, f"GT: green (crowd: grey)   red: {len(preds)} predictions{pred_note}", 0,
           img.shape[0] - strip // 4, (40, 40, 40), fs)
    return img


def write_samples(records: list, results: list[dict], names: dict[int, str], out_dir: str | Path,
                  count: int, score_thresh: float, root: str | Path = ".") -> list[Path]:
    """Draw the first `count` images of `records` (ImageRecord) with GT and predictions >= score_thresh."""
    import cv2
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    written = []
    for rec in records:
        if len(written) >= count:
            break
        path = Path(rec.file)
        if not path.is_absolute() and not path.exists():
            path = Path(root) / path
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            log.warning("sample %s could not be read; skipped", path)
            continue
        gt = [(list(map(float, b)), names.get(int(c), str(c)), bool(cr))
              for b, c, cr in zip(rec.boxes, rec.category_ids, rec.iscrowd)]
        preds = [([r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]],
                  names.get(r["category_id"], str(r["category_id"])), r["score"])
                 for r in by_image.get(rec.image_id, []) if r["score"] >= score_thresh]
        drawing = draw_sample(image, gt, preds, pred_note=f" with score >= {score_thresh:g}")
        ok, data = cv2.imencode(".jpg", drawing, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise RuntimeError(f"could not encode the sample drawing of {path}")
        target = out_dir / f"{rec.image_id}.jpg"
        write_bytes(target, data.tobytes())
        written.append(target)
    for stale in out_dir.glob("*.jpg"):  # drawings of an earlier run that this one did not redraw
        if stale not in written:
            stale.unlink()
    return written


# ------------------------------------------------------------------------------------------ stage
def evaluate_backbone(backbone: str, evaluate, *, seed: int = 0, root: str | Path = ".", split: str = "val",
                      progress: bool = True) -> dict[str, Any]:
    """The evaluate_<backbone> stage: models/<b>/ + data/index/ -> predictions, metrics, plots, samples.

    `evaluate` is params.evaluate (batch size, device, amp, loader workers, scorer, outputs). The input size
    (loader resize, GFLOPs) is the one the model was trained with, from its model.json, so the stage depends on
    models/<b>/ and not on params.model.
    Returns the eval.json dict.
    """
    from mitdet.data.dataset import build_loader
    from mitdet.data.index import load_split
    from mitdet.models import count_parameters, detector_gflops, load_inference_model
    from mitdet.params import model_params_from_dict

    root = Path(root)
    bp = BackbonePaths(backbone)
    dev = resolve_device(evaluate.device)
    amp = evaluate.amp
    model, spec = load_inference_model(str(root / bp.model_dir), device=str(dev))
    categories = spec["categories"]
    label_to_category = {int(c["label"]): int(c["id"]) for c in categories}
    names = {int(c["id"]): c["name"] for c in categories}
    model_params = model_params_from_dict(spec["model"])

    index = load_split(str(root / INDEX_DIR), split)
    index_cats = {(int(c.id), int(c.label)) for c in index.categories}
    if index_cats != {(int(c["id"]), int(c["label"])) for c in categories}:
        raise ValueError(f"{root / bp.model_json}: its categories (id, label) differ from {root / INDEX_DIR}/"
                         "categories.json; the model was trained on another index: rerun its train stage")
    loader = build_loader(index, model=model_params, train=None, seed=seed, training=False,
                          batch_size=evaluate.batch_size, num_workers=evaluate.num_workers, limit_images=evaluate.max_images)
    results, stats = predict(model, loader, dev, label_to_category, amp=amp, progress=progress)
    write_json(root / bp.predictions, results, indent=None)
    log.info("%s: %d detections on %d images in %.1f s (%d unreadable)", backbone, stats["detections"],
             stats["images"], stats["seconds"], stats["skipped"])

    scores = score(root / INDEX_DIR / f"instances_{split}.json", results, scorer=evaluate.scorer,
                   image_ids=stats["image_ids"])

    speed_images: list[torch.Tensor] = []
    if evaluate.speed_images > 0:
        speed_loader = build_loader(index, model=model_params, train=None, seed=seed, training=False, batch_size=1,
                                    num_workers=0, limit_images=evaluate.speed_images)
        speed_images = [im for images, _, _ in speed_loader for im in images]
    speed = measure_speed(model, speed_images, dev, evaluate.speed_warmup, evaluate.speed_images, amp=amp)
    params_m = count_parameters(model) / 1e6
    gflops = float(detector_gflops(model, model_params.min_size, model_params.max_size))

    metrics = eval_metrics(scores, speed, params_m, gflops, stats["images"])
    metrics["images_skipped"] = stats["skipped"]
    left_out = images_left_out_by_index(root / REJECTED_CSV, split)
    if left_out is not None:
        metrics["images_left_out_by_index"] = left_out
    write_json(root / bp.eval_metrics, metrics)
    write_json(root / bp.per_class_metrics, scores.per_class)
    write_text(root / bp.per_class_ap_csv, per_class_ap_csv(scores))
    write_text(root / bp.pr_curve_csv, pr_curve_csv(scores))
    predicted = set(stats["image_ids"])
    write_samples([r for r in index.images if r.image_id in predicted], results, names, root / bp.samples_dir,
                  evaluate.samples, evaluate.sample_score_thresh, root=root)
    print(per_class_table(scores, evaluate.top_k))
    return metrics
