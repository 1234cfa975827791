"""train_<backbone>: train the detector of one backbone from data/index/ and params.yaml.

Writes models/<b>/checkpoints/ (last.pt, best.pt, epoch_NNN.pt; persist), models/<b>/model.safetensors +
model.json, metrics/<b>/train.json and plots/<b>/{train_batches,train_epochs,val_history}.csv. With
`train.nproc_per_node > 1` it re-runs itself under torchrun. SIGINT/SIGTERM: saves last.pt and exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys

from mitdet.params import BACKBONE_NAMES, load_params_or_exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, choices=BACKBONE_NAMES)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)
    if args.backbone not in params.backbones:
        parser.error(f"{args.backbone} is not in params.yaml `backbones:` ({', '.join(params.backbones)})")
    train_params = params.train.for_backbone(args.backbone)

    from mitdet.engine import distributed
    if train_params.nproc_per_node > 1 and not distributed.under_torchrun():
        distributed.relaunch_under_torchrun(train_params.nproc_per_node)  # does not return

    from mitdet.engine.logs import setup_logging
    from mitdet.engine.monitor import NonFiniteLossError
    from mitdet.engine.train import Interrupted, train
    setup_logging()
    try:
        train(args.backbone, train_params, params.model, params.seed)
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # one line, from rank 0 only under torchrun
            print(stop, file=sys.stderr)  # "interrupted at step S: run `dvc repro` again to resume"
        return 128 + stop.signum if stop.signum else 1
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
