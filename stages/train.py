"""train_<backbone>: train the detector of one backbone from data/index/ and params.yaml.

Writes models/<b>/checkpoints/ (last.pt, best.pt, epoch_NNN.pt; persist), models/<b>/model.safetensors +
model.json, metrics/<b>/train.json and plots/<b>/{train_batches,train_epochs,val_history}.csv. With
`train.nproc_per_node > 1` it re-runs itself under torchrun. SIGINT/SIGTERM: saves last.pt and exits non-zero.
"""
from __future__ import annotations

import os
import sys

from mitdet import stage


def main(argv: list[str] | None = None) -> int:
    args = stage.parse_args(__doc__, argv, backbone=True)
    params = stage.load_params(args.params)
    stage.check_backbone(args.backbone, params, args.params)
    train_params = params.train.for_backbone(args.backbone)
    stage.prepare_cpu(train_params.threads, train_params.reproducible)  # before anything imports torch

    from mitdet.engine import distributed
    if train_params.nproc_per_node > 1 and not distributed.under_torchrun():
        distributed.relaunch_under_torchrun(train_params.nproc_per_node)  # does not return

    from mitdet.engine.train import Interrupted, train
    stage.setup_logging(progress_bar=True)
    try:
        # validation scores with evaluate.scorer too (both scorers give the same numbers: not a training dep)
        train(args.backbone, train_params, params.model, params.seed, scorer=params.evaluate.scorer)
    except Interrupted as stop:  # not an error: the run resumes from last.pt
        if os.environ.get("RANK", "0") == "0":  # one line, from rank 0 only under torchrun
            print(stop, file=sys.stderr)  # "interrupted at step S: run `dvc repro` again to resume"
        return 128 + stop.signum if stop.signum else 1
    return 0


if __name__ == "__main__":
    stage.run(main)
