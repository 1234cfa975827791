"""The evaluate_<backbone> stage: load models/<b>/, predict the validation split, score it, write predictions,
metrics, plots and samples; then the same for each test split data/index/layout.json names (no speed, no samples).
"""
from __future__ import annotations

import csv
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mitdet.drawing import write_samples
from mitdet.engine import checkpoint as ckpt
from mitdet.engine.device import resolve_device
from mitdet.engine.inference import measure_speed, predict
from mitdet.engine.scoring import Scores, per_class_table, score
from mitdet.errors import CheckpointError, DataError
from mitdet.io import csv_text, write_json, write_text
from mitdet.models.bundle import load_inference_model
from mitdet.models.detector import set_inference
from mitdet.models.pretrained import load_state_dict_strict
from mitdet.params import ModelParams
from mitdet.runtime import machine_info
from mitdet.paths import INDEX_DIR, REJECTED_CSV, BackbonePaths

log = logging.getLogger(__name__)

# all 12 COCO stats in COCOeval.stats order, then the class spread, speed and size
EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "top10_mAP",
             "bottom10_mAP", "ap_spread", "images_per_s", "ms_per_image", "params_m", "gflops", "num_images")
# scores.json, the evaluate stage's DVC metric: the accuracy keys people compare (timings and counts stay in eval.json)
SCORE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# a test split's entry of eval.json "tests" (then images_skipped, images_left_out_by_index, per_class), and the few
# of its keys scores.json holds: a column each per split in `dvc exp show`, so only the ones people compare
SPLIT_KEYS = (*SCORE_KEYS, "top10_mAP", "bottom10_mAP", "ap_spread", "num_images")
TEST_SCORE_KEYS = ("AP", "AP50", "AP75", "AR100")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a test split's name is a file name in the output folders


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


def score_metrics(backbone: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """scores.json: eval.json's SCORE_KEYS under the backbone's name, so `dvc exp show` names columns `mit_b0.AP`,
    and TEST_SCORE_KEYS of each test split under "tests" (`mit_b0.tests.night.AP`) when there is one."""
    out = {k: metrics[k] for k in SCORE_KEYS if k in metrics}
    if metrics.get("tests"):
        out["tests"] = {name: {k: m.get(k) for k in TEST_SCORE_KEYS} for name, m in metrics["tests"].items()}
    return {backbone: out}


def images_left_out_by_index(rejected_csv: str | Path, split: str = "val") -> int | None:
    """How many images of `split` build_index rejected: its image-level rows (empty `ann_id`) in rejected.csv.

    None when the file is absent (an index built elsewhere).
    """
    path = Path(rejected_csv)
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if row.get("split") == split and not row.get("ann_id"))


# ------------------------------------------------------------------------------------------ stage
MIN_CPU_SHARE = 0.8  # a 1-thread speed measurement that got less of its core than this waited for it


def cpu_share(cpu_seconds: float, wall_seconds: float, threads: int) -> float | None:
    """The share of `threads` cores this process computed over a window (1.0: it never waited for a core)."""
    return cpu_seconds / (wall_seconds * threads) if wall_seconds > 0 and threads > 0 else None


def machine_with_load_warning(device, share: float | None = None) -> dict:
    """machine_info beside the speed figures, with a warning when other work shared the CPU while they were
    measured (the latency then follows the load: many times the idle figure on a busy machine): a load average
    above the cores, or (1 thread) a `share` of its core under MIN_CPU_SHARE, which the lagging average misses."""
    info = machine_info(device)
    load, cores = info.get("load_average") or [0.0], info.get("usable_cores") or 1
    loaded = bool(load and load[0] > cores)
    starved = share is not None and info.get("threads") == 1 and share < MIN_CPU_SHARE
    if loaded or starved:
        log.warning("the machine was busy while speed was measured (load average %.1f on %d cores; this process "
                    "had %s of its core): ms_per_image and images_per_s are inflated; measure again on a quiet "
                    "machine", load[0], cores, "?" if share is None else f"{share:.0%}")
    info["speed_cpu_share"] = None if share is None else round(share, 3)
    info["busy"] = loaded or starved
    return info


def load_evaluated_model(model_dir: Path, weights: str, inference: ModelParams | None, device) -> tuple:
    """models/<b>/ with the weights `evaluate.weights` names (final, best, last, epoch_NNN) and, when given, the
    inference-only settings of `inference` (params.model); returns (model, spec)."""
    model, spec = load_inference_model(str(model_dir), device=str(device))
    if weights != "final":
        path = model_dir / "checkpoints" / f"{weights}.pt"
        if not path.is_file():
            kept = sorted(p.stem for p in path.parent.glob("*.pt")) or ["none"]
            raise CheckpointError("no such checkpoint", where=str(path),
                                  fix=f"set evaluate.weights to final or a kept one ({', '.join(kept)})")
        load_state_dict_strict(model, ckpt.load(path)["model"], str(path))
        model.to(device).eval()
    if inference is not None:
        set_inference(model, inference)
    return model, spec


def evaluate_backbone(backbone: str, evaluate, *, inference: ModelParams | None = None, seed: int = 0,
                      root: str | Path = ".", split: str = "val", progress: bool = True) -> dict[str, Any]:
    """The evaluate_<backbone> stage: models/<b>/ + data/index/ -> predictions, metrics, plots, samples.

    `evaluate` is params.evaluate (weights, batch size, device, amp, loader workers, scorer, outputs); `inference`
    is params.model, of which only the inference-only keys (params.INFERENCE_KEYS) are used. The input size
    (loader resize, GFLOPs) is the one the model was trained with, from its model.json. `split` is scored with
    speed, samples and the per-class files; each test split of data/index/layout.json as well (`run_test_splits`).
    Returns the eval.json dict.
    """
    from mitdet.data.index import load_split
    from mitdet.models import count_parameters, detector_gflops

    root = Path(root)
    bp = BackbonePaths(backbone)
    dev = resolve_device(evaluate.device)
    model, spec = load_evaluated_model(root / bp.model_dir, evaluate.weights, inference, dev)
    run = SplitRun(model, spec, evaluate, dev, seed, root, progress)
    index = load_split(str(root / INDEX_DIR), split)
    check_categories(index, spec["categories"], root, backbone)
    tests = load_test_splits(root, [split])  # before the long val run: a missing test split fails now
    results, stats = run.predict(index)
    write_json(root / bp.predictions, results, indent=None)
    scores = score(root / INDEX_DIR / f"instances_{split}.json", results, scorer=evaluate.scorer,
                   image_ids=stats["image_ids"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    speed = measure_speed(model, run.speed_images(index), dev, evaluate.speed_warmup, evaluate.speed_images,
                          amp=evaluate.amp)
    share = cpu_share(time.process_time() - cpu0, time.perf_counter() - wall0,
                      torch.get_num_threads()) if dev.type == "cpu" and evaluate.speed_images > 0 else None
    params_m = count_parameters(model) / 1e6
    gflops = float(detector_gflops(model, run.model_params.min_size, run.model_params.max_size))

    metrics = eval_metrics(scores, speed, params_m, gflops, stats["images"])
    metrics["images_skipped"] = stats["skipped"]
    left_out = images_left_out_by_index(root / REJECTED_CSV, split)
    if left_out is not None:
        metrics["images_left_out_by_index"] = left_out
    metrics["machine"] = machine_with_load_warning(dev, share)
    test_metrics, test_tables = run_test_splits(run, bp, tests)
    if test_metrics:  # absent without a test split: eval.json as before
        metrics["tests"] = test_metrics
    write_json(root / bp.eval_metrics, metrics)
    write_json(root / bp.scores, score_metrics(backbone, metrics))
    write_json(root / bp.per_class_metrics, scores.per_class)
    write_text(root / bp.per_class_ap_csv, per_class_ap_csv(scores))
    write_text(root / bp.pr_curve_csv, pr_curve_csv(scores))
    predicted = set(stats["image_ids"])
    write_samples([r for r in index.images if r.image_id in predicted], results, run.names, root / bp.samples_dir,
                  evaluate.samples, evaluate.sample_score_thresh, root=root)
    print(per_class_table(scores, evaluate.top_k))
    for name, table in test_tables.items():
        print(f"\nTEST SPLIT {name}\n{table}")
    return metrics


# ------------------------------------------------------------------------------------------ splits
@dataclass
class SplitRun:
    """What every split's evaluation shares: the model, its categories and input size, the evaluate settings."""
    model: torch.nn.Module
    spec: dict
    evaluate: Any
    device: Any
    seed: int
    root: Path
    progress: bool

    def __post_init__(self):
        from mitdet.params import model_params_from_dict
        categories = self.spec["categories"]
        self.label_to_category = {int(c["label"]): int(c["id"]) for c in categories}
        self.names = {int(c["id"]): c["name"] for c in categories}
        self.model_params = model_params_from_dict(self.spec["model"])

    def loader(self, index, batch_size: int, num_workers: int, limit: int):
        from mitdet.data.dataset import build_loader
        return build_loader(index, model=self.model_params, train=None, seed=self.seed, training=False,
                            batch_size=batch_size, num_workers=num_workers, limit_images=limit)

    def predict(self, index) -> tuple[list[dict], dict]:
        """COCO results on the split's images (the first evaluate.max_images, 0 = all) and predict's stats."""
        ev = self.evaluate
        loader = self.loader(index, ev.batch_size, ev.num_workers, ev.max_images)
        results, stats = predict(self.model, loader, self.device, self.label_to_category, amp=ev.amp,
                                 progress=self.progress)
        log.info("%s %s: %d detections on %d images in %.1f s (%d unreadable)", self.spec.get("backbone", ""),
                 index.split, stats["detections"], stats["images"], stats["seconds"], stats["skipped"])
        return results, stats

    def speed_images(self, index) -> list[torch.Tensor]:
        """The first evaluate.speed_images images of `index`, as the model gets them (batch 1)."""
        if self.evaluate.speed_images <= 0:
            return []
        loader = self.loader(index, 1, 0, self.evaluate.speed_images)
        return [im for images, _, _ in loader for im in images]


def check_categories(index, categories: list[dict], root: Path, backbone: str) -> None:
    """The model's (id, label) pairs must be the index's: else it was trained on another index."""
    index_cats = {(int(c.id), int(c.label)) for c in index.categories}
    if index_cats != {(int(c["id"]), int(c["label"])) for c in categories}:
        raise CheckpointError(f"its categories (id, label) differ from {root / INDEX_DIR}/categories.json: the "
                              "model was trained on another index", where=str(root / BackbonePaths(backbone).model_json),
                              fix=f"run `dvc repro train_{backbone}`")


def listed_test_splits(index_dir: str | Path) -> list[str]:
    """The test splits data/index/layout.json names (params order; [] without one), checked as file names."""
    from mitdet.data.index import test_splits
    tests = test_splits(index_dir)
    if not all(SPLIT_NAME.fullmatch(t) for t in tests) or {"train", "val"} & set(tests) or len(set(tests)) < len(tests):
        raise DataError(f'"tests" is {tests!r}: not distinct split names (letters, digits, _ . -; not train or val)',
                        where=str(Path(index_dir) / "layout.json"), fix="run `dvc repro build_index`")
    return tests


def load_test_splits(root: Path, scored: list[str]) -> dict[str, Any]:
    """name -> SplitIndex of each test split (but those in `scored`), its ground truth checked to be there."""
    from mitdet.data.index import load_split
    tests = {}
    for name in listed_test_splits(root / INDEX_DIR):
        if name in scored:
            continue
        gt = root / INDEX_DIR / f"instances_{name}.json"
        if not gt.is_file():
            raise DataError(f"no ground truth for test split '{name}'", where=str(gt), fix="run `dvc repro build_index`")
        tests[name] = load_split(str(root / INDEX_DIR), name)
    return tests


def split_metrics(scores: Scores, stats: dict, left_out: int | None) -> dict[str, Any]:
    """One test split's entry of eval.json "tests": the 12 stats, the class spread, counts and the per-class table."""
    values = {**scores.summary, **scores.aggregates, "num_images": stats["images"]}
    out: dict[str, Any] = {k: values.get(k) for k in SPLIT_KEYS}
    out["images_skipped"] = stats["skipped"]
    if left_out is not None:
        out["images_left_out_by_index"] = left_out
    out["per_class"] = scores.per_class
    return out


def run_test_splits(run: SplitRun, bp: BackbonePaths, tests: dict) -> tuple[dict, dict]:
    """Predict and score each test split: its predictions and per-class CSV in their folders; returns
    (eval.json "tests", name -> the printed per-class table). No speed measurement: that is the val split's."""
    root = run.root
    for folder, suffix in ((bp.test_predictions_dir, ".json"), (bp.test_per_class_ap_dir, ".csv")):
        (root / folder).mkdir(parents=True, exist_ok=True)  # declared DVC outputs: there even when empty
        for stale in (root / folder).glob(f"*{suffix}"):  # a split no longer in layout.json (runs outside DVC)
            if stale.stem not in tests:
                stale.unlink()
    metrics, tables = {}, {}
    for name, index in tests.items():
        results, stats = run.predict(index)
        write_json(root / bp.test_predictions(name), results, indent=None)
        scores = score(root / INDEX_DIR / f"instances_{name}.json", results, scorer=run.evaluate.scorer,
                       image_ids=stats["image_ids"])
        metrics[name] = split_metrics(scores, stats, images_left_out_by_index(root / REJECTED_CSV, name))
        write_text(root / bp.test_per_class_ap_csv(name), per_class_ap_csv(scores))
        tables[name] = per_class_table(scores, run.evaluate.top_k)
    return metrics, tables
