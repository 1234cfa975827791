"""Benchmark: the box head's RoIAlign backward on the CPU, torchvision's kernel against mitdet's, interleaved.

    .venv/bin/python bench/bench_roi_align.py [--backbones mit_b0,mit_b2] [--steps 4] [--threads 1]

1. the backward alone on feature-map shapes of the default input (batch 8, FPN 64 channels, 160x256 images: level
   maps 40x64 down to 5x8), RoIs as many as the box head samples, spread over the levels as its pooler maps them
   at that size (nearly all on the 40x64 level);
2. whole training steps of the detector (params.yaml's settings, random images with a few boxes) with either
   pooler, alternating, median seconds per step and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_naive import step_seconds  # noqa: E402
from mitdet.models import build_detector  # noqa: E402
from mitdet.models.roi_align import roi_align_backward  # noqa: E402
from mitdet.params import load_params  # noqa: E402


def op_rounds(rois_per_level: list[int], rounds: int) -> dict[str, list[float]]:
    """Seconds of one backward over all four levels, torchvision's and mitdet's, `rounds` times each."""
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"torchvision": [], "mitdet": []}
    levels = []
    for level, k in enumerate(rois_per_level):
        h, w, scale = 40 >> level, 64 >> level, 0.25 / 2 ** level
        feature = torch.randn(8, 64, h, w, generator=g, requires_grad=True)
        xy = torch.rand(k, 2, generator=g) * torch.tensor([230.0, 140.0])
        wh = 4 + torch.rand(k, 2, generator=g) * torch.tensor([80.0, 60.0]) * 2 ** level
        rois = torch.cat([torch.randint(0, 8, (k, 1), generator=g).float(), xy, xy + wh], 1)
        out = torchvision.ops.roi_align(feature, rois, 7, spatial_scale=scale, sampling_ratio=2)
        levels.append((feature, rois, scale, out, torch.randn(out.shape, generator=g)))
    for _ in range(rounds):
        start = time.perf_counter()
        for feature, _, _, out, grad in levels:
            torch.autograd.grad(out, feature, grad, retain_graph=True)
        times["torchvision"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for feature, rois, scale, _, grad in levels:
            roi_align_backward(grad, rois, feature.shape, scale, (7, 7), 2)
        times["mitdet"].append(time.perf_counter() - start)
    return times


def step_rounds(name: str, params, steps: int) -> dict[str, list[float]]:
    """Seconds per training step of the detector with torchvision's pooler and with mitdet's (two models, the same
    initial weights), alternating."""
    models = {}
    for key in ("torchvision", "mitdet"):
        torch.manual_seed(0)
        models[key] = build_detector(name, 9, params.model)
    models["torchvision"].roi_heads.box_roi_pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    return step_seconds(models, params, name, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backbones", default="mit_b0")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rois", default="1000,20,4,0",
                        help="RoIs per level 0..3 (the box head samples 8 x 128; at 160x256 nearly all land on level 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    print(f"threads={args.threads} input={params.model.min_size}x{params.model.max_size}")
    times = op_rounds([int(k) for k in args.rois.split(",")], rounds=max(3, args.steps))
    tv, ours = statistics.median(times["torchvision"]), statistics.median(times["mitdet"])
    print(f"backward alone, RoIs {args.rois}: torchvision {tv * 1000:.1f} ms, mitdet {ours * 1000:.1f} ms, "
          f"{tv / ours:.2f}x")
    for name in args.backbones.split(","):
        times = step_rounds(name, params, args.steps)
        tv, ours = statistics.median(times["torchvision"]), statistics.median(times["mitdet"])
        print(f"{name} training step: torchvision's pooler {tv:.3f} s, mitdet's {ours:.3f} s, {tv / ours:.2f}x "
              f"(steps {[round(t, 3) for t in times['torchvision']]} / {[round(t, 3) for t in times['mitdet']]})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
