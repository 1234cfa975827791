"""The saved inference model: `models/<backbone>/model.safetensors` + `model.json`, what train writes and evaluate
loads.

model.json (the spec) says how to rebuild the detector: format, backbone, num_classes (K + 1), categories (id, name,
contiguous label), the model params (modality and fusion among them), aux_channels (0 for RGB; N: the input is
3 + N channels), which checkpoint the weights came from and its step. Only safetensors is
read back: loading a model runs no pickled code.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from mitdet.errors import CheckpointError
from mitdet.io import atomic_path, read_json, write_json
from mitdet.models.detector import build_detector
from mitdet.models.pretrained import CheckpointMismatchError, load_state_dict_strict
from mitdet.params import BACKBONE_NAMES, ModelParams, model_params_from_dict, to_dict

INFERENCE_FORMAT = "mitdet-detector-v1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
SPEC_FIELDS = ("backbone", "num_classes", "categories", "model")  # what save and load need
CATEGORY_FIELDS = ("id", "name", "label")
# model params added with RGB+X: a model.json written before them is an RGB model with these defaults
RGBX_MODEL_KEYS = ("modality", "fusion", "aux_mean", "aux_std")


def inference_spec(backbone: str, categories: Iterable, model: ModelParams, weights_from: str,
                   step: int) -> dict[str, Any]:
    """The model.json dict of a trained detector; `categories` are objects with .id, .name and .label."""
    categories = list(categories)
    return {"format": INFERENCE_FORMAT, "backbone": backbone, "num_classes": len(categories) + 1,
            "categories": [{"id": c.id, "name": c.name, "label": c.label} for c in categories],
            "model": to_dict(model), "weights_from": weights_from, "step": step}


def save_inference_model(model: nn.Module, spec: dict, model_dir: str | os.PathLike) -> None:
    """Write `model.safetensors` and `model.json` (spec: backbone, num_classes, categories, model) atomically."""
    missing = [k for k in SPEC_FIELDS if k not in spec]
    if missing:
        raise ValueError(f"inference model spec lacks {missing}; it needs backbone, num_classes, categories, model")
    model = getattr(model, "module", model)  # a DDP wrapper's model
    spec = {**spec, "aux_channels": aux_channels_of(model)}  # from the model itself: what its weights take
    # safetensors wants plain contiguous CPU tensors (channels_last weights are not contiguous)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    model_dir = Path(model_dir)
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": INFERENCE_FORMAT})
    write_json(model_dir / SPEC_FILE, {"format": INFERENCE_FORMAT, **{k: v for k, v in spec.items() if k != "format"}})


def aux_channels_of(model: nn.Module) -> int:
    """The aux channels a detector's input carries besides RGB (0 for an RGB model)."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    return int(getattr(body, "aux_channels", 0))


def _with_rgbx_defaults(spec: dict) -> dict:
    """`spec` with the RGB+X keys an older model.json lacks: modality rgb (and the default fusion, aux_mean,
    aux_std) in its model params, aux_channels 0."""
    model = spec["model"]
    if isinstance(model, dict):
        defaults = to_dict(ModelParams())
        model = {**{k: defaults[k] for k in RGBX_MODEL_KEYS if k not in model}, **model}
    return {**spec, "model": model, "aux_channels": spec.get("aux_channels", 0)}


def _retrain(backbone: Any) -> str:
    """The fix for a saved model that is missing or broken: rerun the train stage that writes it."""
    if isinstance(backbone, str) and backbone in BACKBONE_NAMES:
        return f"run `dvc repro train_{backbone}` to write it again"
    return "run `dvc repro train_<backbone>` for the backbone it belongs to"


def _read_spec(model_dir: Path) -> dict:
    """model.json, checked: a readable object of format INFERENCE_FORMAT with every field a detector needs."""
    path = model_dir / SPEC_FILE
    fix = _retrain(model_dir.name)
    if not model_dir.is_dir():
        raise CheckpointError("no saved model here", where=str(model_dir), fix=fix)
    if not path.is_file():
        raise CheckpointError("missing: the model folder has no spec", where=str(path), fix=fix)
    try:
        spec = read_json(path)
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        reason = str(err).removeprefix(f"{path}: ")  # read_json's errors name the file already
        raise CheckpointError(f"cannot be read ({reason})", where=str(path), fix=fix) from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"holds a {type(spec).__name__}, not a model spec object", where=str(path), fix=fix)
    fix = _retrain(spec.get("backbone", model_dir.name))
    if spec.get("format") != INFERENCE_FORMAT:
        raise CheckpointError(f"format is {spec.get('format')!r}, expected {INFERENCE_FORMAT!r}",
                              where=str(path), fix=fix)
    missing = [k for k in SPEC_FIELDS if k not in spec]
    if missing:
        raise CheckpointError(f"lacks {', '.join(missing)} (it needs {', '.join(SPEC_FIELDS)})",
                              where=str(path), fix=fix)
    categories = spec["categories"]
    if not isinstance(categories, list) or not all(
            isinstance(c, dict) and all(k in c for k in CATEGORY_FIELDS) for c in categories):
        raise CheckpointError("categories must be a list of objects with id, name and label",
                              where=str(path), fix=fix)
    if not isinstance(spec["num_classes"], int) or isinstance(spec["num_classes"], bool):
        raise CheckpointError(f"num_classes is {spec['num_classes']!r}, not an integer", where=str(path), fix=fix)
    spec = _with_rgbx_defaults(spec)
    aux = spec["aux_channels"]
    if not isinstance(aux, int) or isinstance(aux, bool) or aux < 0:
        raise CheckpointError(f"aux_channels is {aux!r}, not a count of channels (0 or more)", where=str(path),
                              fix=fix)
    return spec


def _mismatch_summary(err: CheckpointMismatchError, shown: int = 5) -> str:
    parts = []
    for label, keys in (("missing", err.missing), ("unexpected", err.unexpected),
                        ("mis-shaped", [k for k, _, _ in err.mismatched])):
        if keys:
            more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:shown])}{more})")
    return "; ".join(parts)


def load_inference_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The detector saved by `save_inference_model`, in eval mode on `device`, and its spec (safetensors only).

    A missing or broken model folder raises CheckpointError naming the file and the train stage that rewrites it.
    """
    model_dir = Path(model_dir)
    spec = _read_spec(model_dir)
    spec_path, weights_path = model_dir / SPEC_FILE, model_dir / WEIGHTS_FILE
    fix = _retrain(spec["backbone"])
    try:
        # the weights are all in the file: no pretrained download, no compile for plain inference
        params = dataclasses.replace(model_params_from_dict(spec["model"]), pretrained=None, compile=False)
        with torch.device("meta"):  # no random init that the weights would overwrite (seconds for mit_b5)
            model = build_detector(spec["backbone"], spec["num_classes"], params, aux_channels=spec["aux_channels"])
    except (ValueError, TypeError, KeyError) as err:  # ParamsError is a ValueError; unknown backbone, bad sizes
        raise CheckpointError(f"does not describe a detector this code builds ({err})", where=str(spec_path),
                              fix=fix) from None
    if not weights_path.is_file():
        raise CheckpointError("missing: the model folder has a spec but no weights", where=str(weights_path),
                              fix=fix)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # SafetensorError (truncated, not safetensors), OSError
        raise CheckpointError(f"not a readable safetensors file ({err})", where=str(weights_path), fix=fix) from None
    try:
        load_state_dict_strict(model, state, str(weights_path), assign=True)
    except CheckpointMismatchError as err:
        raise CheckpointError(f"does not fit the {spec['backbone']} detector that {SPEC_FILE} describes: "
                              f"{_mismatch_summary(err)}", where=str(weights_path), fix=fix) from None
    _materialise(model, params)
    return model.to(device).eval(), spec


def _materialise(model: nn.Module, params: ModelParams) -> None:
    """After an assigning load into a meta-built detector: the anchors (plain tensor attributes, not state) made
    again, and the memory format `model.channels_last` asks for."""
    for module in model.modules():
        if isinstance(module, AnchorGenerator):
            module.cell_anchors = [module.generate_anchors(s, a) for s, a in zip(module.sizes, module.aspect_ratios,
                                                                                  strict=True)]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"bug: tensors left on the meta device after loading: {left[:5]}")
    if params.channels_last:
        model.to(memory_format=torch.channels_last)


PREDICTOR_PREFIX = "roi_heads.box_predictor."  # the class-specific layers: rebuilt for new categories


def init_from_model(detector: nn.Module, model_dir: str | os.PathLike, categories: Iterable) -> bool:
    """Start `detector` from the trained model in `model_dir`: every weight loaded, except the box predictor
    when the categories (id, name) differ, which keeps its fresh init. Returns whether it was kept."""
    model_dir = Path(model_dir)
    spec = _read_spec(model_dir)
    weights = model_dir / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except Exception as err:  # SafetensorError, OSError
        raise CheckpointError(f"not a readable safetensors file ({err})", where=str(weights),
                              fix="point model.pretrained at a trained model folder") from None
    own = [(int(c.id), str(c.name)) for c in categories]
    same = own == [(int(c["id"]), str(c["name"])) for c in spec["categories"]]
    if not same:
        state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIX)}
        state.update({k: v for k, v in detector.state_dict().items() if k.startswith(PREDICTOR_PREFIX)})
    try:
        load_state_dict_strict(detector, state, f"{model_dir} (a {spec['backbone']} model)")
    except CheckpointMismatchError as err:
        raise CheckpointError(f"does not fit this detector: {_mismatch_summary(err)}", where=str(weights),
                              fix="start from a model of the same backbone and model settings") from None
    return not same

