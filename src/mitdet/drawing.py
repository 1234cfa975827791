"""Sample drawings for `dvc plots`: an image with its ground-truth boxes and the predictions above a score.

OpenCV only; it knows records (ImageRecord) and COCO results, not models.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mitdet.io import write_bytes

log = logging.getLogger(__name__)

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
              for b, c, cr in zip(rec.boxes, rec.category_ids, rec.iscrowd, strict=False)]
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
