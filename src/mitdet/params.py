"""params.yaml -> one frozen, validated dataclass tree.

Every key is declared here with its type and allowed range. params.yaml must hold every key (the dataclass
defaults serve code and tests only): a missing, unknown or duplicate key, a wrong type or an out-of-range value
raises `ParamsError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mitdet.errors import ParamsError

# The one list of backbones; `Params.backbones` takes its Literal from it.
BACKBONE_NAMES = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
MAX_SEED = 2**32 - 1       # numpy's legacy seeding takes [0, 2**32 - 1]
MAX_BATCH_SIZE = 4096
# COCO scorers, all giving pycocotools' numbers: fast (numpy, engine/coco_fast.py), faster_coco_eval (C++),
# pycocotools (the reference)
SCORERS = ("pycocotools", "faster_coco_eval", "fast")
DEFAULT_SCORER = "fast"


def _range(lo=None, hi=None, *, lo_open=False):
    return {"range": (lo, hi, lo_open)}


def _f(default=dataclasses.MISSING, lo=None, hi=None, lo_open=False, **kw):
    """A field with an allowed range [lo, hi] (lo excluded when lo_open)."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata=_range(lo, hi, lo_open=lo_open), **kw)
    return field(default=default, metadata=_range(lo, hi, lo_open=lo_open), **kw)


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SyntheticParams:
    train_images: int = _f(800, lo=1, hi=1_000_000)
    val_images: int = _f(100, lo=1, hi=1_000_000)
    min_side: int = _f(128, lo=32, hi=4096)
    max_side: int = _f(192, lo=32, hi=4096)
    max_objects: int = _f(6, lo=1, hi=100)
    grayscale_fraction: float = _f(0.1, lo=0.0, hi=1.0)
    empty_fraction: float = _f(0.05, lo=0.0, hi=1.0)
    crowd_fraction: float = _f(0.03, lo=0.0, hi=1.0)
    jpeg_quality: int = _f(90, lo=1, hi=100)
    # thermal: an aligned 1-channel 16-bit thermal PNG per image (warm/cold twins of some classes, told apart only by
    # it) for model.modality rgbx; none leaves the default data as it is
    aux: Literal["none", "thermal"] = "none"

    def __post_init__(self):
        if self.min_side > self.max_side:
            raise ParamsError(f"data.synthetic.min_side ({self.min_side}) must not exceed max_side ({self.max_side})")


@dataclass(frozen=True)
class Coco2017Params:
    base_url: str = "http://images.cocodataset.org"
    download_dir: str = "data/downloads/coco2017"
    splits: list[Literal["train", "val"]] = field(default_factory=lambda: ["train", "val"])
    subset: int = _f(0, lo=0)
    subset_mode: Literal["first", "random"] = "first"
    retries: int = _f(5, lo=0, hi=100)
    timeout_s: float = _f(60.0, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class SplitPaths:
    images: str
    annotations: str
    aux: Optional[str] = None   # a folder of auxiliary images aligned with `images` (same file stem), or null


@dataclass(frozen=True)
class LocalParams:
    train: SplitPaths
    val: SplitPaths
    tests: dict[str, SplitPaths] = field(default_factory=dict)   # extra test splits (e.g. day, night), by name


@dataclass(frozen=True)
class YoloSplit:
    images: str                 # image files (.jpg/.png) or (H, W, C) uint8 .npy arrays (channels 3.. are aux)
    labels: str                 # `<stem>.txt` per image: `class x_center y_center width height`, normalised
    aux: Optional[str] = None   # a folder of auxiliary images aligned with `images` (same file stem), or null


@dataclass(frozen=True)
class YoloParams:
    train: YoloSplit
    val: Optional[YoloSplit] = None      # null: a seeded `val_fraction` of train
    val_fraction: float = _f(0.2, lo=0.0, hi=1.0, lo_open=True)
    names: list[str] = field(default_factory=list)   # class names; a label's class is its index here
    negatives: Literal["keep", "drop"] = "keep"        # images without a label file, or with an empty one
    tests: dict[str, YoloSplit] = field(default_factory=dict)   # extra test splits (e.g. day, night), by name

    def __post_init__(self):
        if not self.names:
            raise ParamsError("data.yolo.names lists no class", where="data.yolo.names",
                              fix="list the class names in the order of the label files' class ids")
        if self.val is None and self.val_fraction >= 1.0:
            raise ParamsError(f"data.yolo.val_fraction = {self.val_fraction} leaves no training image",
                              where="data.yolo.val_fraction", fix="use a fraction below 1 (e.g. 0.2)")


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "coco2017", "local", "yolo"]
    synthetic: SyntheticParams
    coco2017: Coco2017Params
    local: LocalParams
    yolo: YoloParams = field(default_factory=lambda: YoloParams(
        train=YoloSplit("data/yolo/images", "data/yolo/labels"), names=["object"]))

    def __post_init__(self):
        tests = self.local.tests if self.source == "local" else self.yolo.tests if self.source == "yolo" else {}
        bad = [name for name in tests if name in ("train", "val") or not re.fullmatch(r"[A-Za-z0-9_-]+", name)]
        if bad:
            raise ParamsError(f"test split name {bad[0]!r} is not allowed", where=f"data.{self.source}.tests",
                              fix="use letters, digits, _ or - (not train or val)")


@dataclass(frozen=True)
class IndexParams:
    min_box_size: float = _f(2.0, lo=0.0, lo_open=True)
    workers: int = _f(2, lo=1, hi=256)
    aux_channels: int = _f(0, lo=0, hi=16)   # 0: RGB only; N: each image needs an aligned N-channel aux image


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class RpnParams:
    pre_nms_top_n_train: int = _f(2000, lo=1)
    pre_nms_top_n_test: int = _f(1000, lo=1)
    post_nms_top_n_train: int = _f(2000, lo=1)
    post_nms_top_n_test: int = _f(1000, lo=1)
    nms_thresh: float = _f(0.7, lo=0.0, hi=1.0)
    fg_iou_thresh: float = _f(0.7, lo=0.0, hi=1.0)
    bg_iou_thresh: float = _f(0.3, lo=0.0, hi=1.0)
    batch_size_per_image: int = _f(256, lo=1)
    positive_fraction: float = _f(0.5, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True)
class RoiParams:
    batch_size_per_image: int = _f(512, lo=1)
    positive_fraction: float = _f(0.25, lo=0.0, hi=1.0, lo_open=True)
    fg_iou_thresh: float = _f(0.5, lo=0.0, hi=1.0)
    bg_iou_thresh: float = _f(0.5, lo=0.0, hi=1.0)
    score_thresh: float = _f(0.05, lo=0.0, hi=1.0)
    nms_thresh: float = _f(0.5, lo=0.0, hi=1.0)
    detections_per_img: int = _f(100, lo=1)
    representation_size: int = _f(1024, lo=8, hi=16384)   # width of the two-layer box head (torchvision: 1024)


@dataclass(frozen=True)
class ModelParams:
    pretrained: Optional[str] = None
    drop_path_rate: float = _f(0.1, lo=0.0, hi=1.0)
    frozen_stages: int = _f(0, lo=0, hi=4)
    fpn_channels: int = _f(256, lo=8, hi=1024)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: int = _f(800, lo=32, hi=4096)
    max_size: int = _f(1333, lo=32, hi=8192)
    rpn: RpnParams = field(default_factory=RpnParams)
    roi: RoiParams = field(default_factory=RoiParams)
    channels_last: bool = False
    compile: bool = False
    modality: Literal["rgb", "rgbx"] = "rgb"   # rgbx: a second MiT stream on an aligned auxiliary image, fused
    fusion: Literal["cmx", "add", "concat", "switch", "guided"] = "cmx"  # rgbx: how the streams are fused at each stage
    aux_mean: list[float] = field(default_factory=lambda: [0.5])   # rgbx: one value, or one per aux channel
    aux_std: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self):
        if not self.aux_mean or not self.aux_std:
            raise ParamsError("model.aux_mean and model.aux_std need at least one value", where="model.aux_mean")
        if any(s <= 0 for s in self.aux_std):
            raise ParamsError(f"model.aux_std must be positive; got {self.aux_std}", where="model.aux_std")
        if len(self.anchor_sizes) != 5:
            raise ParamsError(f"model.anchor_sizes must list 5 sizes, one per FPN level (P2..P6); got {self.anchor_sizes}")
        if any(s <= 0 for s in self.anchor_sizes) or not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ParamsError("model.anchor_sizes and model.aspect_ratios must be positive and non-empty")
        if self.min_size > self.max_size:
            raise ParamsError(f"model.min_size ({self.min_size}) must not exceed model.max_size ({self.max_size})")


# ---------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class AugmentParams:
    hflip: float = _f(0.5, lo=0.0, hi=1.0)
    color_jitter: float = _f(0.0, lo=0.0, hi=1.0)
    multi_scale: list[int] = field(default_factory=list)

    def __post_init__(self):
        if any(not 32 <= s <= 4096 for s in self.multi_scale):
            raise ParamsError(f"train.augment.multi_scale sizes must lie in [32, 4096]; got {self.multi_scale}")


@dataclass(frozen=True)
class QuickEvalParams:
    interval: int = _f(100, lo=0)
    samples: int = _f(8, lo=1)
    top_k: int = _f(5, lo=1)


@dataclass(frozen=True)
class ValParams:
    interval: int = _f(1, lo=0)
    unit: Literal["epochs", "steps"] = "epochs"
    max_images: int = _f(100, lo=0)
    monitor: Literal["AP", "AP50", "AP75"] = "AP50"


@dataclass(frozen=True)
class EarlyStoppingParams:
    patience: int = _f(0, lo=0)
    min_delta: float = _f(0.0, lo=0.0)


@dataclass(frozen=True)
class CheckpointParams:
    every_steps: int = _f(100, lo=0)
    keep: int = _f(2, lo=0)
    keep_finished: int = _f(4, lo=0, hi=1000)   # finished runs kept (final weights) to restore without training


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _f(8, lo=1)
    max_steps: int = _f(0, lo=0)
    batch_size: int = _f(8, lo=1, hi=MAX_BATCH_SIZE)
    lr: float = _f(1e-3, lo=0.0, hi=10.0, lo_open=True)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = _f(0.05, lo=0.0)
    backbone_lr_mult: float = _f(1.0, lo=0.0)
    warmup_steps: int = _f(50, lo=0)
    warmup_epochs: float = _f(0.0, lo=0.0)   # > 0: warmup length in epochs, replacing warmup_steps
    warmup_factor: float = _f(1e-3, lo=0.0, hi=1.0)
    scheduler: Literal["constant", "cosine", "multistep", "step", "onecycle", "plateau", "cosine_restarts"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.7, 0.9])
    gamma: float = _f(0.1, lo=0.0, hi=1.0, lo_open=True)
    step_size: int = _f(1000, lo=1)
    restart_steps: int = _f(500, lo=1)
    min_lr_ratio: float = _f(0.01, lo=0.0, hi=1.0)
    plateau_patience: int = _f(2, lo=0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    grad_accum: int = _f(1, lo=1, hi=MAX_BATCH_SIZE)
    clip_grad_norm: float = _f(10.0, lo=0.0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_workers: int = _f(2, lo=0, hi=64)
    threads: int = _f(0, lo=0, hi=1024)
    # pinned CPU kernel levels (runtime.py): none | avx2 | portable ("off" would read as false in YAML)
    reproducible: Literal["none", "avx2", "portable"] = "none"
    nproc_per_node: int = _f(1, lo=1, hi=64)
    augment: AugmentParams = field(default_factory=AugmentParams)
    quick_eval: QuickEvalParams = field(default_factory=QuickEvalParams)
    val: ValParams = field(default_factory=ValParams)
    early_stopping: EarlyStoppingParams = field(default_factory=EarlyStoppingParams)
    checkpoint: CheckpointParams = field(default_factory=CheckpointParams)
    overfit_batches: int = _f(0, lo=0, hi=10_000)
    max_nonfinite_steps: int = _f(5, lo=1)
    log_every_steps: int = _f(10, lo=1)
    tensorboard: bool = False
    per_backbone: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ParamsError(f"train.betas must be two numbers in [0, 1); got {self.betas}")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ParamsError(f"train.milestones must be increasing fractions of the run in (0, 1); got {self.milestones}")
        for name, overrides in self.per_backbone.items():
            if name not in BACKBONE_NAMES:
                raise ParamsError(f"train.per_backbone: unknown backbone '{name}'; allowed: {', '.join(BACKBONE_NAMES)}")
            if not isinstance(overrides, dict):
                raise ParamsError(f"train.per_backbone.{name} must be a mapping of train keys; got {overrides!r}")
            if "per_backbone" in overrides:
                raise ParamsError(f"train.per_backbone.{name} cannot itself hold per_backbone")
            # validate now: a typo in an override fails before any stage runs
            _build(TrainParams, _merge(self._base(), overrides), f"train.per_backbone.{name}")

    def for_backbone(self, backbone: str) -> "TrainParams":
        """These train params with `per_backbone[backbone]` applied (and no per_backbone left)."""
        return _build(TrainParams, _merge(self._base(), self.per_backbone.get(backbone, {})), "train")

    def _base(self) -> dict:
        """These params as a full dict with no per_backbone: what an override is merged onto."""
        return dict(_as_dict(self, drop=("per_backbone",)), per_backbone={})


# ------------------------------------------------------------------------------------- evaluate/report
@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _f(8, lo=1, hi=MAX_BATCH_SIZE)
    max_images: int = _f(0, lo=0)
    scorer: Literal[SCORERS] = DEFAULT_SCORER
    top_k: int = _f(10, lo=1)
    samples: int = _f(6, lo=0)
    sample_score_thresh: float = _f(0.3, lo=0.0, hi=1.0)
    speed_images: int = _f(8, lo=0)
    speed_warmup: int = _f(1, lo=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    num_workers: int = _f(2, lo=0, hi=64)
    threads: int = _f(0, lo=0, hi=1024)
    reproducible: Literal["none", "avx2", "portable"] = "none"
    weights: str = "final"   # final (model.safetensors) | best | last | epoch_NNN (models/<b>/checkpoints/*.pt)

    def __post_init__(self):
        if not re.fullmatch(r"final|best|last|epoch_\d{3,}", self.weights):
            raise ParamsError(f"{self.weights!r} names no checkpoint", where="evaluate.weights",
                              fix="use final, best, last or epoch_NNN (e.g. epoch_003)")


@dataclass(frozen=True)
class ReportParams:
    metric: Literal["AP", "AP50", "AP75"] = "AP"
    heatmap_max_classes: int = _f(40, lo=1)


@dataclass(frozen=True)
class Params:
    seed: int = _f(lo=0, hi=MAX_SEED)
    backbones: list[Literal[BACKBONE_NAMES]]
    data: DataParams
    index: IndexParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    report: ReportParams

    def __post_init__(self):
        if not self.backbones:
            raise ParamsError("backbones must list at least one of " + ", ".join(BACKBONE_NAMES))
        if len(set(self.backbones)) != len(self.backbones):
            raise ParamsError(f"backbones lists a name twice: {self.backbones}")
        self._check_modality()
        missing = [b for b in self.backbones if b not in self.train.per_backbone]
        if missing:  # each train stage declares its own entry as a DVC param, so it must exist
            raise ParamsError(f"`train.per_backbone` has no entry for {', '.join(missing)}",
                              fix=f"add `{missing[0]}: {{}}` (an empty mapping: no overrides)")


    def _check_modality(self) -> None:
        """model.modality rgbx needs aux images in the index, and aux_mean/aux_std one value or one per channel."""
        channels = self.index.aux_channels
        if self.model.modality == "rgbx" and channels == 0:
            raise ParamsError("model.modality is rgbx but index.aux_channels is 0 (the index keeps no aux image)",
                              where="index.aux_channels", fix="set it to the aux image's channel count (e.g. 2)")
        for key in ("aux_mean", "aux_std"):
            values = getattr(self.model, key)
            if channels and len(values) not in (1, channels):
                raise ParamsError(f"model.{key} needs 1 or index.aux_channels ({channels}) values; got {values}",
                                  where=f"model.{key}", fix="give one value for all aux channels")


# Keys that only shape predictions: the evaluate stages depend on them, the train stages do not (their own
# validation reads them), and the checkpoint fingerprint leaves them out.
INFERENCE_KEYS = ("model.rpn.pre_nms_top_n_test", "model.rpn.post_nms_top_n_test", "model.roi.score_thresh",
                  "model.roi.nms_thresh", "model.roi.detections_per_img")
# train keys that do not change the weights a run ends with (logs, loader workers, checkpoint cadence); a
# backbone's overrides are declared by its own stage (train.per_backbone.<b>)
NOT_SHAPING_TRAIN = ("train.log_every_steps", "train.tensorboard", "train.num_workers", "train.quick_eval",
                     "train.checkpoint", "train.per_backbone")


def shaping_keys(cls, prefix: str, exclude: tuple[str, ...]) -> list[str]:
    """Dotted keys of `cls` minus `exclude`: a group whole, unless some excluded key lies inside it."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if key in exclude:
            continue
        if dataclasses.is_dataclass(hints[f.name]) and any(e.startswith(key + ".") for e in exclude):
            keys += shaping_keys(hints[f.name], key, exclude)
        else:
            keys.append(key)
    return keys


def train_stage_params(backbone: str) -> list[str]:
    """The params train_<backbone> reads that shape its weights (its DVC params; the fingerprint's parts)."""
    return ["seed", *shaping_keys(ModelParams, "model", INFERENCE_KEYS),
            *shaping_keys(TrainParams, "train", NOT_SHAPING_TRAIN), f"train.per_backbone.{backbone}"]


def shaping_values(obj, prefix: str, exclude: tuple[str, ...]) -> dict:
    """The values of `shaping_keys` of a params object, by dotted key."""
    out = {}
    for key in shaping_keys(type(obj), prefix, exclude):
        value = obj
        for part in key.split(".")[1:]:
            value = getattr(value, part)
        out[key] = to_dict(value)
    return out


# ------------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (DVC refuses such a params.yaml too)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in first_line:
                raise ParamsError(f"duplicate key `{key}` at line {line} (first at line {first_line[key]})",
                                  fix="keep one of the two")
            if isinstance(key, typing.Hashable):
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming the key at fault."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the project root, or pass the path of params.yaml") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    except ParamsError as err:
        raise _located(err, str(path)) from None
    return params_from_dict(raw if raw is not None else {}, source=str(path))


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """Params from the dict form of a whole params.yaml, which must hold every key."""
    try:
        return _build(Params, raw, "")
    except ParamsError as err:
        raise _located(err, source) from None


def model_params_from_dict(raw: dict, source: str = "model") -> ModelParams:
    """ModelParams from its full dict form (e.g. model.json's `model`), validated like params.yaml's `model`."""
    try:
        return _build(ModelParams, raw, "model")
    except ParamsError as err:
        if err.what.startswith("missing key"):  # a saved model holds every key: an older mitdet wrote it
            err = ParamsError(err.what, fix="the file was written by an older mitdet; retrain the model")
        raise _located(err, source) from None


def to_dict(obj) -> Any:
    """A params dataclass (or part of one) as plain YAML-able data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _as_dict(obj, drop=()) -> dict:
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in drop}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _located(err: ParamsError, source: str | None) -> ParamsError:
    """A copy of `err` (what and fix kept) placed in `source`; None keeps its own place."""
    where = source if not err.where or source is None else f"{source}: {err.where}"
    return ParamsError(err.what, where=where, fix=err.fix)


def _build(cls, raw, where: str):
    """An instance of the params dataclass `cls` from `raw`, which must hold every field; `where` is its dotted key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"`{where or 'params'}` must be a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ParamsError(f"unknown key `{key}`; allowed keys here: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            raise ParamsError(f"missing key `{key}`", fix=f"add it to params.yaml ({_example(f, hints[name])})")
        values[name] = _convert(hints[name], raw[name], key)
        _check_range(f, values[name], key)
    try:
        return cls(**values)
    except ParamsError as err:
        raise _located(err, None) from None


def _check_range(f: dataclasses.Field, value, key: str) -> None:
    """Raise ParamsError when the number `value` of field `f` lies outside the field's range."""
    lo, hi, lo_open = f.metadata.get("range", (None, None, False))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
            raise ParamsError(f"`{key}` = {value!r} is out of range; allowed: {_range_text(lo, hi, lo_open)}")


def _range_text(lo, hi, lo_open) -> str:
    return f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _example(f: dataclasses.Field, tp) -> str:
    """What to write for the missing field `f`: its default as YAML, else the keys or range it takes."""
    if dataclasses.is_dataclass(tp):
        return f"the `{f.name}:` section with the keys {', '.join(g.name for g in dataclasses.fields(tp))}"
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        return f"for example `{f.name}: {text.removesuffix('...').strip()}`"
    lo, hi, lo_open = f.metadata.get("range", (None, None, False))
    bounds = f" in {_range_text(lo, hi, lo_open)}" if lo is not None or hi is not None else ""
    return f"`{f.name}:` takes {_kind(tp)}{bounds}"


def _kind(tp) -> str:
    """`tp` in words, for a message: "an integer", "one of: a, b", "a list of numbers"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin is list and typing.get_origin(args[0]) is Literal:
        return "a list drawn from: " + ", ".join(map(str, typing.get_args(args[0])))
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], _type_name(args[0]))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, _type_name(tp))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str):
    """`value` checked against (and converted to) the type `tp` of the key `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"`{key}` = {value!r} is not allowed; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"`{key}` must be a list; got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"`{key}` must be a mapping; got {value!r}")
        return {k: (_convert(args[1], v, f"{key}.{k}") if args[1] is not Any else v) for k, v in value.items()}
    return value if tp is Any else _convert_scalar(tp, value, key)


def _convert_scalar(tp, value, key: str):
    """`value` checked against the scalar type `tp` (bool, int, float or str)."""
    if tp is bool and not isinstance(value, bool):
        raise ParamsError(f"`{key}` must be true or false; got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"`{key}` must be an integer; got {value!r}")
    if tp is float:
        return _to_float(value, key)
    if tp is str and (not isinstance(value, str) or not value):
        raise ParamsError(f"`{key}` must be a non-empty string; got {value!r}")
    if tp in (bool, int, str):
        return value
    raise ParamsError(f"`{key}`: unsupported type {_type_name(tp)}")  # a bug in this file, not in params.yaml


def _to_float(value, key: str) -> float:
    """`value` as a finite float; a string float() reads is accepted (YAML 1.1 reads `1e-3` as a string)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamsError(f"`{key}` must be a number; got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ParamsError(f"`{key}` must be a finite number; got {value!r}")
    return float(value)
