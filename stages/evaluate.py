"""evaluate_<backbone>: score models/<backbone>/ on the validation split.

Writes data/predictions/<b>.json, metrics/<b>/eval.json + per_class.json, plots/<b>/ (per-class AP, PR curves,
sample drawings) and prints the per-class table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from mitdet.params import BACKBONE_NAMES, load_params_or_exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, choices=BACKBONE_NAMES)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params_or_exit(args.params)
    if args.backbone not in params.backbones:
        parser.error(f"{args.backbone} is not in params.yaml `backbones:` ({', '.join(params.backbones)})")
    if params.evaluate.threads:
        import torch
        torch.set_num_threads(params.evaluate.threads)

    from mitdet.engine.evaluate import evaluate_backbone
    metrics = evaluate_backbone(args.backbone, params.evaluate, seed=params.seed, progress=sys.stderr.isatty())
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
