"""The saved detector as one ONNX graph, pre- and post-processing included, checked against PyTorch on export.

Graph: `image` uint8 [height, width, 3] RGB (any size) -> `boxes` float32 [N, 4] (x1, y1, x2, y2 in the image's
pixels), `scores` float32 [N], `labels` int64 [N] (the model's contiguous labels; the model.json categories,
with their COCO ids and names, are in the file's metadata as `mitdet_categories`). Inside: the evaluate loader's
resize (shorter side to min_size unless the longer passes max_size, bilinear), ImageNet normalisation, the
detector with its own score threshold, NMS and top-k, boxes mapped back per axis and clipped as
engine/inference.py does. An RGB+X model (model.json aux_channels N) takes `image` float32 [1, 3 + N, height, width]
instead: RGB then the aux channels, each in 0..1 (uint8 / 255, uint16 / 65535, as the loader scales them), resized
and normalised inside the same way. Exported with TorchScript tracing (`dynamo=False`): the dynamo exporter fails on
torchvision's detection models.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mitdet.errors import MitdetError

OPSET = 17
INSTALL = "install the export extra: pip install -c requirements.lock -e '.[export]' (onnx, onnxruntime)"


class ExportError(MitdetError, RuntimeError):
    """An export that cannot run (onnx or onnxruntime missing) or whose graph disagrees with PyTorch."""


def require_onnx():
    """(onnx, onnxruntime) modules, or an ExportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"{err.name or 'onnx'} is not installed, and ONNX export needs it", fix=INSTALL) from None
    return onnx, onnxruntime


def _keep(image, target=None):
    return image, target


class OnnxDetector(nn.Module):
    """uint8 RGB [H, W, 3] -> (boxes xyxy in its pixels, scores, labels): resize, the detector, boxes mapped back."""

    def __init__(self, detector: nn.Module, min_size: int, max_size: int):
        super().__init__()
        self.detector = detector
        # the input arrives at its detector size, as from the loader; torchvision's own resize check calls
        # round() on a traced size, which tracing cannot do
        detector.transform.resize = _keep
        self.min_size, self.max_size = float(min_size), float(max_size)

    def forward(self, image: torch.Tensor):
        size = torch._shape_as_tensor(image)[:2].to(torch.float32)  # traced: the graph takes any height/width
        h, w = size[0], size[1]
        scale = torch.minimum(self.min_size / torch.minimum(h, w), self.max_size / torch.maximum(h, w))
        nh = torch.round(h * scale).clamp(min=1).to(torch.int64)  # data/transforms.py resized_shape
        nw = torch.round(w * scale).clamp(min=1).to(torch.int64)
        x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)[0] / 255.0
        out = self.detector([x])[0]
        fx, fy = w / nw.to(torch.float32), h / nh.to(torch.float32)
        boxes = out["boxes"] * torch.stack([fx, fy, fx, fy])
        boxes = torch.minimum(boxes.clamp(min=0), torch.stack([w, h, w, h]))
        return boxes, out["scores"], out["labels"]


class OnnxRgbxDetector(OnnxDetector):
    """float32 [1, 3 + N, H, W] in 0..1 (RGB, then the aux channels) -> (boxes in its pixels, scores, labels)."""

    def forward(self, image: torch.Tensor):
        size = torch._shape_as_tensor(image)[2:].to(torch.float32)
        h, w = size[0], size[1]
        scale = torch.minimum(self.min_size / torch.minimum(h, w), self.max_size / torch.maximum(h, w))
        nh = torch.round(h * scale).clamp(min=1).to(torch.int64)
        nw = torch.round(w * scale).clamp(min=1).to(torch.int64)
        x = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)[0]
        out = self.detector([x])[0]
        fx, fy = w / nw.to(torch.float32), h / nh.to(torch.float32)
        boxes = out["boxes"] * torch.stack([fx, fy, fx, fy])
        boxes = torch.minimum(boxes.clamp(min=0), torch.stack([w, h, w, h]))
        return boxes, out["scores"], out["labels"]


def input_text(spec: dict) -> str:
    """The graph's input, as its metadata and the CLI describe it."""
    n = int(spec.get("aux_channels", 0))
    if n:
        return f"image: float32 [1, 3 + {n}, height, width], RGB then {n} aux channel(s), each in 0..1"
    return "image: uint8 [height, width, 3] RGB"


def write_onnx(wrapper: OnnxDetector, spec: dict, out_path: str | os.PathLike, sample: np.ndarray) -> None:
    """Trace `wrapper` on `sample` (uint8 HxWx3, or float32 [1, 3 + N, H, W] for RGB+X) into an ONNX file with
    the model's metadata, checked by onnx."""
    onnx, _ = require_onnx()
    import warnings
    axes = {0: "height", 1: "width"} if sample.ndim == 3 else {2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings on torchvision's shape arithmetic: expected
        torch.onnx.export(wrapper, (torch.from_numpy(sample),), str(out_path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["boxes", "scores", "labels"],
                          dynamic_axes={"image": axes, "boxes": {0: "detections"},
                                        "scores": {0: "detections"}, "labels": {0: "detections"}})
    graph = onnx.load(str(out_path))
    meta = {"mitdet_backbone": spec["backbone"], "mitdet_categories": json.dumps(spec["categories"]),
            "mitdet_input": input_text(spec), "mitdet_step": str(spec.get("step")),
            "mitdet_score_threshold": str(spec["model"]["roi"]["score_thresh"])}
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(out_path))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes [N, 4] x [M, 4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


@dataclass
class Parity:
    """How one image's ONNX detections compare with PyTorch's."""
    torch_n: int
    onnx_n: int
    matched: int
    box_diff: float     # largest coordinate difference of matched pairs (pixels)
    score_diff: float   # largest score difference of matched pairs
    unexplained: int    # unmatched detections not at a tie (score near the other list's cut-off)


def match_detections(a: tuple, b: tuple, score_tol: float, iou_min: float = 0.5) -> Parity:
    """Pair detections of the same label greedily by IoU, then measure; order-independent (ties in score)."""
    (ba, sa, la), (bb, sb, lb) = a, b
    iou = box_iou(ba, bb) if len(ba) and len(bb) else np.zeros((len(ba), len(bb)))
    iou[la[:, None] != lb[None, :]] = 0.0
    pairs, used_a, used_b = [], set(), set()
    for i, j in zip(*np.unravel_index(np.argsort(-iou, axis=None), iou.shape), strict=True):
        if iou[i, j] < iou_min:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    ia, ib = (np.array([p[k] for p in pairs], dtype=int) for k in (0, 1))
    box_diff = float(np.abs(ba[ia] - bb[ib]).max()) if pairs else 0.0
    score_diff = float(np.abs(sa[ia] - sb[ib]).max()) if pairs else 0.0
    # a detection one side kept and the other cut at the top-k or the score threshold: a tie, not a fault
    cut_a, cut_b = (s.min() if len(s) else np.inf for s in (sa, sb))
    lone = [sa[i] > cut_b + score_tol for i in range(len(sa)) if i not in used_a]
    lone += [sb[j] > cut_a + score_tol for j in range(len(sb)) if j not in used_b]
    return Parity(len(sa), len(sb), len(pairs), box_diff, score_diff, int(sum(lone)))


def check_parity(onnx_path: str | os.PathLike, wrapper: OnnxDetector, images: list[np.ndarray],
                 score_tol: float = 1e-3) -> list[Parity]:
    """ONNX Runtime's detections against PyTorch's (the same wrapper) on each input (uint8 RGB, or RGB+X)."""
    _, ort = require_onnx()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = wrapper.cpu().eval()
    out = []
    for image in images:
        with torch.no_grad():
            ref = tuple(t.numpy() for t in wrapper(torch.from_numpy(image)))
        got = tuple(session.run(None, {"image": image}))
        out.append(match_detections(ref, got, score_tol))
    return out


@dataclass
class ExportReport:
    path: Path
    parity: list[Parity]
    seconds: float

    @property
    def box_diff(self) -> float:
        return max((p.box_diff for p in self.parity), default=0.0)

    @property
    def score_diff(self) -> float:
        return max((p.score_diff for p in self.parity), default=0.0)

    @property
    def unexplained(self) -> int:
        return sum(p.unexplained for p in self.parity)

    def text(self) -> str:
        n = sum(p.torch_n for p in self.parity)
        matched = sum(p.matched for p in self.parity)
        return (f"checked on {len(self.parity)} image(s) with onnxruntime: {matched}/{n} PyTorch detections matched "
                f"(label + IoU); largest difference: boxes {self.box_diff:.3g} px, scores {self.score_diff:.3g}; "
                f"{self.unexplained} unmatched beyond score ties")


def export_checked(model: nn.Module, spec: dict, out_path: str | os.PathLike, images: list[np.ndarray],
                   box_tol: float = 0.1, score_tol: float = 1e-3) -> ExportReport:
    """Export to `out_path` and check it on `images` (uint8 RGB; for RGB+X float32 [1, 3 + N, H, W]); the file
    appears only when it agrees."""
    import time

    from mitdet.io import atomic_path
    require_onnx()
    start = time.perf_counter()
    kind = OnnxRgbxDetector if spec.get("aux_channels", 0) else OnnxDetector
    wrapper = kind(model.cpu().eval(), spec["model"]["min_size"], spec["model"]["max_size"]).eval()
    with atomic_path(Path(out_path)) as tmp:  # removed unless the checks pass
        write_onnx(wrapper, spec, tmp, images[0])
        report = ExportReport(Path(out_path), check_parity(tmp, wrapper, images, score_tol),
                              time.perf_counter() - start)
        if report.box_diff > box_tol or report.score_diff > score_tol or report.unexplained:
            raise ExportError(f"the ONNX graph disagrees with PyTorch ({report.text()}; tolerances: boxes "
                              f"{box_tol:g} px, scores {score_tol:g}); nothing written", where=str(out_path),
                              fix="report it with the model folder; --box-tol/--score-tol loosen the check")
    return report


def load_check_inputs(spec: dict, paths: list[str] | None, count: int, index_dir: str = "data/index",
                      aux_dir: str | None = None) -> list[np.ndarray]:
    """Up to `count` inputs of the model's graph: `load_check_images`, or for RGB+X float32 [1, 3 + N, H, W]
    arrays through the evaluate loader, from `paths` with `aux_dir` (predict's lookup) or the validation index."""
    channels = int(spec.get("aux_channels", 0))
    if not channels:
        return load_check_images(paths, count, index_dir)
    from mitdet.data.dataset import build_loader
    from mitdet.engine.predict_files import IMAGE_SUFFIXES, check_aux_use, find_images, image_split
    from mitdet.errors import DataError
    from mitdet.params import model_params_from_dict
    if paths:
        check_aux_use(spec, aux_dir)
        split, _ = image_split(find_images(paths, IMAGE_SUFFIXES | {".npy"}), [], aux_dir, channels)
        where = " ".join(paths)
    else:
        split, where = _validation_split(index_dir, "pass --check-images PATH --check-aux DIR")
        split.images = split.images[:count]
    loader = build_loader(split, model=model_params_from_dict(spec["model"]), train=None, seed=0, training=False,
                          batch_size=1, num_workers=0)
    inputs = [im.numpy()[None] for images, _, _ in loader for im in images][:count]
    if not inputs:
        raise DataError("no readable image with its aux image to check the export on", where=where,
                        fix="pass --check-images PATH and --check-aux DIR (aux images by file stem)")
    return inputs


def _validation_split(index_dir: str, option: str):
    """(the validation index, its path) to check an export on; without an index a DataError offering `option`."""
    from mitdet.data.index import load_split
    from mitdet.errors import DataError
    where = f"{index_dir}/val.jsonl"
    if not Path(where).is_file():
        raise DataError("no images to check the export on", where=where,
                        fix=f"{option}, or run in the project after `dvc repro build_index`")
    return load_split(index_dir, "val"), where


def load_check_images(paths: list[str] | None, count: int, index_dir: str = "data/index") -> list[np.ndarray]:
    """Up to `count` uint8 RGB images from `paths` (files or folders), or else from the validation index."""
    import cv2

    from mitdet.data.dataset import READ_FLAGS
    from mitdet.errors import DataError
    if paths:
        from mitdet.engine.predict_files import find_images
        files = [str(p) for p, _ in find_images(paths).images]
        where = " ".join(paths)
    else:
        split, where = _validation_split(index_dir, "pass --check-images PATH (a few real images)")
        files = [r.file for r in split.images]
    images = []
    for file in files:
        image = cv2.imread(file, READ_FLAGS)
        if image is not None:
            images.append(np.ascontiguousarray(image[:, :, ::-1]))  # BGR -> RGB
        if len(images) >= count:
            break
    if not images:
        raise DataError("no readable image to check the export on", where=where, fix="pass --check-images PATH")
    return images
