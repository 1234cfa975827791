"""Seconds per training step and per-image inference latency of each backbone at params.yaml's settings.

    .venv/bin/python bench/bench_train_step.py [--backbones mit_b0,mit_b5] [--steps 5] [--threads 2]

Uses the real detector builder and optimizer on random images of the configured input size with a few boxes
each (the step cost barely depends on pixel content). Prints one row per backbone; BENCHMARKS.md holds figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mitdet.engine.optim import build_optimizer  # noqa: E402
from mitdet.models import build_detector, count_parameters  # noqa: E402
from mitdet.params import load_params  # noqa: E402


def batch(n: int, height: int, width: int, generator: torch.Generator):
    images = [torch.rand(3, height, width, generator=generator) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(4, 2, generator=generator) * torch.tensor([width * 0.35, height * 0.35])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 9, (4,), generator=generator)})
    return images, targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backbones", default="")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    names = args.backbones.split(",") if args.backbones else params.backbones
    height, width = params.model.min_size, params.model.max_size  # landscape at the largest input the transform keeps
    g = torch.Generator().manual_seed(0)
    print(f"threads={args.threads} input={height}x{width} steps={args.steps}")
    print(f"{'backbone':10} {'batch':>5} {'params_M':>8} {'s/step':>7} {'img/s':>6} {'eval_ms/img':>11}")
    for name in names:
        train = params.train.for_backbone(name)
        model = build_detector(name, 9, params.model)
        optimizer = build_optimizer(model, train)
        images, targets = batch(train.batch_size, height, width, g)
        model.train()
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step:  # the first step pays one-off allocation costs
                times.append(time.perf_counter() - start)
        model.eval()
        lat = []
        with torch.no_grad():
            for i in range(args.steps + 1):
                start = time.perf_counter()
                model([images[i % len(images)]])
                if i:
                    lat.append(time.perf_counter() - start)
        s = statistics.median(times)
        print(f"{name:10} {train.batch_size:5d} {count_parameters(model) / 1e6:8.2f} {s:7.2f} "
              f"{train.batch_size / s:6.1f} {1000 * statistics.median(lat):11.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
