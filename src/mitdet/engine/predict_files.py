"""Predicting image files with a saved model: the evaluate stage's loader and inference over files found on disk.

The output is one COCO-format JSON (what `pycocotools.coco.COCO(path)` loads): `images` (id, file_name, width,
height, path), `categories` (id, name) and `annotations`, the detections (COCO results fields image_id,
category_id, bbox [x, y, w, h] in the file's pixels, score, plus id, area, iscrowd 0), with `info` (model, score
threshold) and `skipped` (files that could not be read). Image ids number the files in the order found.

An RGB+X model (model.json aux_channels N > 0) takes an aligned aux image per image: `<aux folder>/<file stem>`
.png or .npy (the stem relative to the folder given, as the index looks it up), or, for an .npy image of 3 + N
channels, its channels 3..; an image without a usable aux image is skipped with the reason, as a bad image is.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mitdet.data.headers import BAD_HEADER, EMPTY, MISSING, NOT_IMAGE, TRUNCATED, probe, read_header
from mitdet.data.index import AUX_EXTS, Category, ImageRecord, SplitIndex
from mitdet.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pbm", ".pgm",
                            ".ppm"})
REASONS = {MISSING: "no such file", EMPTY: "empty file", NOT_IMAGE: "not an image",
           TRUNCATED: "truncated image file", BAD_HEADER: "unreadable image header"}
NO_BOXES = np.zeros((0, 4), np.float32)


@dataclass
class FoundImages:
    """Image files to predict (path, file_name), files that cannot be used (path, reason), and the count of
    files inside the folders that were passed over for their suffix (not images by name)."""
    images: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_images: int = 0


def find_images(paths: Iterable[str | os.PathLike], suffixes: frozenset[str] = IMAGE_SUFFIXES) -> FoundImages:
    """Files named, and image files (by suffix) under folders, recursively, sorted; file_name is relative to the
    folder given (a file's own name), or the path itself where two would be equal."""
    found, seen = FoundImages(), set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if f.suffix.lower() in suffixes:
                    found.images.append((f, f.relative_to(path).as_posix()))
                else:
                    found.not_images += 1
        elif path.exists():
            found.images.append((path, path.name))
        else:
            found.skipped.append((str(path), "no such file or folder"))
    unique = []
    for path, name in found.images:
        key = os.path.realpath(path)
        if key not in seen:  # a file reached twice (named and inside a folder) is predicted once
            seen.add(key)
            unique.append((path, name))
    counts = Counter(n for _, n in unique)
    found.images = [(p, n if counts[n] == 1 else p.as_posix()) for p, n in unique]
    return found


def image_size(path: Path) -> tuple[int, int, str]:
    """(width, height, "") from the header (JPEG/PNG) or, for other formats, by decoding; (0, 0, why) if unusable."""
    width, height, reason = probe(str(path))
    if reason != NOT_IMAGE:
        return width, height, REASONS.get(reason, reason)
    import cv2

    from mitdet.data.dataset import READ_FLAGS
    image = cv2.imread(str(path), READ_FLAGS)  # BMP, WebP, TIFF...: no header reader here, so decode once
    if image is None:
        return 0, 0, REASONS[NOT_IMAGE] + " (no format OpenCV reads)"
    return int(image.shape[1]), int(image.shape[0]), ""


def find_aux(path: Path, name: str, aux_dir: str | None, channels: int, size: tuple[int, int]) -> tuple[str, str]:
    """(aux file, "") of an image for an RGB+X model of `channels` aux channels, or ("", why it has none)."""
    if aux_dir is None:
        if path.suffix.lower() != ".npy":
            return "", "no aux image: pass --aux FOLDER (aux images by file stem)"
        hd = read_header(str(path))
        if hd.channels != 3 + channels:
            return "", f"an .npy of {hd.channels} channels; the model takes 3 + {channels}"
        return str(path), ""
    base = os.path.join(aux_dir, os.path.splitext(name if not Path(name).is_absolute() else path.name)[0])
    found = [base + ext for ext in AUX_EXTS if os.path.isfile(base + ext)]
    if len(found) != 1:
        return "", (f"no aux image {base}.png or .npy" if not found else f"two aux images: {' and '.join(found)}")
    hd = read_header(found[0])
    if hd.reason or hd.kind not in ("png", "npy") or hd.bits not in (8, 16):
        return "", f"aux image {found[0]}: unreadable header or not an 8/16-bit PNG or .npy"
    if (hd.width, hd.height) != size:
        return "", f"aux image {found[0]} is {hd.width}x{hd.height}, the image {size[0]}x{size[1]}"
    if hd.channels != channels:
        return "", f"aux image {found[0]} has {hd.channels} channels; the model takes {channels}"
    return found[0], ""


def image_split(found: FoundImages, categories: list[dict], aux_dir: str | None = None,
                aux_channels: int = 0) -> tuple[SplitIndex, dict[int, str]]:
    """The readable files as an index split (ids 1..N, no boxes) for `build_loader`; id -> file_name. With
    `aux_channels`, each record's aligned aux image (`find_aux`); an image without one is skipped."""
    records, names = [], {}
    for path, name in found.images:
        width, height, reason = image_size(path)
        aux = None
        if not reason and aux_channels:
            aux, reason = find_aux(path, name, aux_dir, aux_channels, (width, height))
        if reason:
            found.skipped.append((str(path), reason))
            continue
        image_id = len(records) + 1
        records.append(ImageRecord(image_id=image_id, file=str(path), width=width, height=height, boxes=NO_BOXES,
                                   labels=np.zeros(0, np.int64), category_ids=np.zeros(0, np.int64),
                                   iscrowd=np.zeros(0, bool), aux=aux))
        names[image_id] = name
    cats = [Category(int(c["id"]), str(c["name"]), int(c["label"])) for c in categories]
    return SplitIndex(split="predict", images=records, categories=cats, aux_channels=aux_channels), names


def check_aux_use(spec: dict, aux_dir: str | None) -> int:
    """The model's aux channel count, once `--aux` fits it: refused for an RGB model, a folder for RGB+X."""
    channels = int(spec.get("aux_channels", 0))
    if aux_dir is not None and not channels:
        raise DataError("the model is RGB-only; --aux is for RGB+X models", where=f"--aux {aux_dir}",
                        fix="leave out --aux, or use a model trained with model.modality rgbx")
    if aux_dir is not None and not Path(aux_dir).is_dir():
        raise DataError("no such folder", where=f"--aux {aux_dir}", fix="pass the folder of the aux images")
    return channels


@dataclass
class Prediction:
    """What `predict_files` made: the output document, the records predicted, and the run's numbers."""
    document: dict[str, Any]
    records: list[ImageRecord]
    skipped: list[tuple[str, str]]
    seconds: float
    device: str
    not_images: int = 0  # files in the folders left alone for their names (not image files)


def predict_files(model, spec: dict, paths: Iterable[str | os.PathLike], device, *, batch_size: int = 8,
                  num_workers: int = 0, amp: str = "auto", score_thresh: float | None = None,
                  model_dir: str = "", progress: bool = False, aux_dir: str | None = None) -> Prediction:
    """Detections on every readable image under `paths`, through the evaluate stage's loader and `predict`
    (for an RGB+X model, with each image's aux image from `aux_dir`)."""
    from mitdet.data.dataset import build_loader
    from mitdet.engine.inference import predict
    from mitdet.params import model_params_from_dict

    paths = list(paths)
    channels = check_aux_use(spec, aux_dir)
    found = find_images(paths, IMAGE_SUFFIXES | {".npy"} if channels else IMAGE_SUFFIXES)
    split, names = image_split(found, spec["categories"], aux_dir, channels)
    if not split.images:
        listed = "; ".join(f"{p}: {why}" for p, why in found.skipped[:5]) or "no image files"
        raise DataError(f"no image to predict ({listed})", where=" ".join(map(str, paths)) or "PATH",
                        fix="pass image files or folders holding .jpg/.png/... files" + (
                            ", with --aux FOLDER holding an aux image per image (same stem)" if channels else ""))
    model_params = model_params_from_dict(spec["model"])
    threshold = model_params.roi.score_thresh if score_thresh is None else float(score_thresh)
    model.roi_heads.score_thresh = threshold  # the box head's own filter: lower than the model's finds more
    loader = build_loader(split, model=model_params, train=None, seed=0, training=False, batch_size=batch_size,
                          num_workers=num_workers)
    label_to_category = {int(c["label"]): int(c["id"]) for c in spec["categories"]}
    results, stats = predict(model, loader, device, label_to_category, amp=amp, progress=progress)
    predicted = set(stats["image_ids"])
    for rec in split.images:
        if rec.image_id not in predicted:
            found.skipped.append((rec.file, "cannot be decoded"))
    records = [r for r in split.images if r.image_id in predicted]
    info = {"description": "mitdet predict", "model": model_dir, "backbone": spec["backbone"],
            "step": spec.get("step"), "score_threshold": threshold}
    document = coco_document(records, names, spec["categories"], results, info, found.skipped)
    return Prediction(document, records, found.skipped, stats["seconds"], str(device), found.not_images)


def coco_document(records: list[ImageRecord], names: dict[int, str], categories: list[dict], results: list[dict],
                  info: dict, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The COCO-format output: images, categories, detections as annotations with scores, skipped files."""
    annotations = [{"id": i, **r, "area": round(r["bbox"][2] * r["bbox"][3], 2), "iscrowd": 0}
                   for i, r in enumerate(results, 1)]
    return {"info": info,
            "images": [{"id": r.image_id, "file_name": names[r.image_id], "width": r.width, "height": r.height,
                        "path": r.file} for r in records],
            "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories],
            "annotations": annotations,
            "skipped": [{"path": p, "reason": why} for p, why in skipped]}


def drawing_name(file_name: str) -> str:
    """Where an image's drawing goes under the drawing folder: its file_name, as a .jpg."""
    return file_name if Path(file_name).suffix.lower() in (".jpg", ".jpeg") else f"{file_name}.jpg"


def _drawable(path: str, imread, flags) -> np.ndarray | None:
    """The BGR image to draw on: the file decoded, or channels 0..2 (RGB) of an .npy image."""
    if imread is not None:
        return imread(path, flags)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return np.ascontiguousarray(array[:, :, 2::-1]) if array.ndim == 3 and array.shape[2] >= 3 else None


def draw_predictions(document: dict, out_dir: str | os.PathLike, score_thresh: float) -> list[Path]:
    """Each predicted image with its detections >= `score_thresh` (boxes, class names, scores) as a JPEG."""
    import cv2

    from mitdet.data.dataset import READ_FLAGS
    from mitdet.drawing import draw_sample
    from mitdet.io import write_bytes

    names = {c["id"]: c["name"] for c in document["categories"]}
    by_image: dict[int, list] = {}
    for a in document["annotations"]:
        if a["score"] >= score_thresh:
            x, y, w, h = a["bbox"]
            by_image.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], names[a["category_id"]], a["score"]))
    written = []
    for im in document["images"]:
        image = _drawable(im["path"], cv2.imread if not im["path"].lower().endswith(".npy") else None, READ_FLAGS)
        if image is None:  # it was decoded moments ago: changed or removed since
            log.warning("%s could not be read again to draw it; not drawn", im["path"])
            continue
        drawing = draw_sample(image, [], by_image.get(im["id"], []), pred_note=f" with score >= {score_thresh:g}")
        ok, data = cv2.imencode(".jpg", drawing, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"could not encode the drawing of {im['path']}")
        target = Path(out_dir) / drawing_name(im["file_name"])
        write_bytes(target, data.tobytes())
        written.append(target)
    return written
