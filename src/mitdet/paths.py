"""Where each stage reads and writes, relative to the project root: one place for dvc.yaml and the stages."""
from __future__ import annotations

from dataclasses import dataclass

RAW_DIR = "data/raw"                      # prepare_data: data/raw/manifest.json (+ generated data)
RAW_MANIFEST = "data/raw/manifest.json"   # {"source", "splits": {split: {"images", "annotations"}}}
INDEX_DIR = "data/index"                  # build_index: <split>.jsonl, categories.json, instances_<split>.json
REJECTED_CSV = "data/index/rejected.csv"
INDEX_METRICS = "metrics/index.json"
PREDICTIONS_DIR = "data/predictions"
REPORT_JSON = "metrics/report.json"
REPORT_MD = "metrics/report.md"
REPORT_SUMMARY = "metrics/summary.json"   # the report's DVC metric: best backbone and its score
REPORT_PLOTS = "plots/report"
REPORT_AP_BY_SPLIT_CSV = "plots/report/ap_by_split.csv"  # backbone, split, AP, AP50, AP75: val and each test split

# The code that trains, relative to src/mitdet: the train stages' code deps in dvc.yaml AND what the checkpoint
# fingerprint hashes, from this one list, so an edit that reruns training also refuses to resume across it.
# Not here: drawing, the evaluate stage, the report, export, and file names (paths.py), which shape no weights.
TRAIN_CODE = ("engine/train.py", "engine/state.py", "engine/stopping.py", "engine/optim.py", "engine/checkpoint.py",
              "engine/logs.py", "engine/monitor.py", "engine/distributed.py", "engine/device.py",
              "engine/inference.py", "engine/scoring.py", "engine/coco_fast.py", "models/mit.py", "models/rgbx.py",
              "models/detector.py", "models/roi_align.py", "models/pretrained.py", "models/bundle.py", "data/index.py",
              "data/dataset.py", "data/headers.py", "data/decode.py", "data/transforms.py", "data/sampler.py",
              "params.py", "io.py", "errors.py", "runtime.py")


@dataclass(frozen=True)
class BackbonePaths:
    """The files of one backbone's train and evaluate stages."""
    backbone: str

    @property
    def model_dir(self) -> str:
        return f"models/{self.backbone}"

    @property
    def checkpoints(self) -> str:  # last.pt, best.pt, epoch_NNN.pt: persist, not cached
        return f"models/{self.backbone}/checkpoints"

    @property
    def weights(self) -> str:
        return f"models/{self.backbone}/model.safetensors"

    @property
    def model_json(self) -> str:
        return f"models/{self.backbone}/model.json"

    @property
    def train_metrics(self) -> str:
        return f"metrics/{self.backbone}/train.json"

    @property
    def eval_metrics(self) -> str:
        return f"metrics/{self.backbone}/eval.json"

    @property
    def per_class_metrics(self) -> str:
        return f"metrics/{self.backbone}/per_class.json"

    @property
    def scores(self) -> str:  # the evaluate stage's DVC metric: eval.json's accuracy keys
        return f"metrics/{self.backbone}/scores.json"

    @property
    def train_summary(self) -> str:  # the train stage's DVC metric: steps, final loss, best validation score
        return f"metrics/{self.backbone}/train_summary.json"

    @property
    def plots_dir(self) -> str:
        return f"plots/{self.backbone}"

    @property
    def train_batches_csv(self) -> str:
        return f"plots/{self.backbone}/train_batches.csv"

    @property
    def train_epochs_csv(self) -> str:
        return f"plots/{self.backbone}/train_epochs.csv"

    @property
    def val_history_csv(self) -> str:
        return f"plots/{self.backbone}/val_history.csv"

    @property
    def per_class_ap_csv(self) -> str:
        return f"plots/{self.backbone}/per_class_ap.csv"

    @property
    def pr_curve_csv(self) -> str:
        return f"plots/{self.backbone}/pr_curve.csv"

    @property
    def samples_dir(self) -> str:
        return f"plots/{self.backbone}/samples"

    @property
    def predictions(self) -> str:  # the validation split's
        return f"{PREDICTIONS_DIR}/{self.backbone}.json"

    # test splits (data/index/layout.json "tests"): one file per split in a folder, so dvc.yaml can declare them
    # without knowing the names; the folders exist (empty) when there is no test split
    @property
    def test_predictions_dir(self) -> str:
        return f"{PREDICTIONS_DIR}/{self.backbone}"

    def test_predictions(self, split: str) -> str:
        return f"{self.test_predictions_dir}/{split}.json"

    @property
    def test_per_class_ap_dir(self) -> str:
        return f"plots/{self.backbone}/per_class_ap_tests"

    def test_per_class_ap_csv(self, split: str) -> str:
        return f"{self.test_per_class_ap_dir}/{split}.csv"
