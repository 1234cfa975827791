"""evaluate_<backbone>: score models/<backbone>/ on the validation split and on each test split of the index.

Writes data/predictions/<b>.json, metrics/<b>/eval.json + per_class.json, plots/<b>/ (per-class AP, PR curves,
sample drawings) and prints the per-class table; each test split: data/predictions/<b>/<split>.json,
plots/<b>/per_class_ap_tests/<split>.csv, eval.json and scores.json "tests", its table printed after val's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mitdet import stage


def main(argv: list[str] | None = None) -> int:
    args = stage.parse_args(__doc__, argv, backbone=True)
    stage.setup_logging()
    params = stage.load_params(args.params)
    stage.check_backbone(args.backbone, params, args.params)
    stage.prepare_cpu(params.evaluate.threads, params.evaluate.reproducible)  # before anything imports torch

    from mitdet.engine.evaluate import evaluate_backbone  # torch: imported once the arguments are known good
    from mitdet.engine.stopping import locked
    from mitdet.paths import BackbonePaths
    # one evaluation of a backbone at a time (an orphaned one beside a new `dvc repro` would write the same files)
    # (beside the model files, not in the checkpoints folder: that is the train stage's output)
    with locked(Path(BackbonePaths(args.backbone).model_dir), name=".evaluate.lock", who="evaluation"):
        metrics = evaluate_backbone(args.backbone, params.evaluate, inference=params.model, seed=params.seed,
                                    progress=sys.stderr.isatty())
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    stage.run(main)
