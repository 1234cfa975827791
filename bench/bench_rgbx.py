"""RGB+X cost: parameters and GFLOPs per MiT variant and fusion, and CPU training step time against RGB-only.

    .venv/bin/python bench/bench_rgbx.py [--aux 2] [--sizes 160x256,512x640] [--fusions cmx,add,...]
                                         [--step-backbones mit_b0,mit_b2] [--steps 5] [--threads 1]

The detectors are params.yaml's (fpn_channels, heads, anchors) with modality rgb and rgbx x each fusion, N aux
channels (2, as the issue's data: thermal + event); `--fusions` (default: every one, cmx add concat switch guided)
picks the size table's rows, and `--step-backbones ''` skips the step times. GFLOPs by models.detector_gflops (one eval forward, the heads
included). Step time: forward + backward + AdamW step on a batch of random images of the configured input size,
rgb and rgbx steps interleaved (so load drifts hit both), 1 thread; the median of `--steps` after a warm-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mitdet.engine.optim import build_optimizer  # noqa: E402
from mitdet.models import build_detector, count_parameters, detector_gflops  # noqa: E402
from mitdet.models.mit import MIT_CONFIGS  # noqa: E402
from mitdet.models.rgbx import FUSIONS  # noqa: E402
from mitdet.params import load_params  # noqa: E402

NUM_CLASSES = 9  # the synthetic default's 8 classes + background


def variants(model, aux: int, fusions=FUSIONS):
    """(label, model params, aux_channels): RGB-only, then rgbx with each fusion."""
    yield "rgb", dataclasses.replace(model, modality="rgb"), 0
    for fusion in fusions:
        yield f"rgbx {fusion}", dataclasses.replace(model, modality="rgbx", fusion=fusion), aux


def size_table(model, aux: int, sizes: list[tuple[int, int]], fusions=FUSIONS) -> None:
    """One row per backbone x variant: parameters (M) and GFLOPs at each size."""
    heads = " | ".join(f"GFLOPs {h}x{w}" for h, w in sizes)
    print(f"| backbone | model | params (M) | {heads} |")
    print("|---|---|---:|" + "---:|" * len(sizes))
    for backbone in MIT_CONFIGS:
        for label, params, n in variants(model, aux, fusions):
            torch.manual_seed(0)
            det = build_detector(backbone, NUM_CLASSES, params, aux_channels=n).eval()
            flops = " | ".join(f"{detector_gflops(det, h, w):.1f}" for h, w in sizes)
            print(f"| {backbone} | {label} | {count_parameters(det) / 1e6:.2f} | {flops} |", flush=True)
            del det


def batch(n: int, channels: int, height: int, width: int, generator: torch.Generator):
    images = [torch.rand(channels, height, width, generator=generator) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(4, 2, generator=generator) * torch.tensor([width * 0.35, height * 0.35])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, NUM_CLASSES, (4,),
                                                                                      generator=generator)})
    return images, targets


def step_times(backbone: str, model, train, aux: int, steps: int, fusion: str) -> dict[str, float]:
    """Median seconds per training step of RGB-only and of rgbx `fusion`, measured interleaved."""
    runs = {}
    for label, params, n in variants(model, aux):
        if label not in ("rgb", f"rgbx {fusion}"):
            continue
        torch.manual_seed(0)
        det = build_detector(backbone, NUM_CLASSES, params, aux_channels=n).train()
        runs[label] = (det, build_optimizer(det, train), 3 + n, [])
    gen = torch.Generator().manual_seed(0)
    height, width = model.min_size, model.max_size
    for i in range(steps + 1):  # the first step of each is a warm-up
        for det, opt, channels, times in runs.values():
            images, targets = batch(train.batch_size, channels, height, width, gen)
            start = time.perf_counter()
            loss = sum(det(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - start)
    return {label: statistics.median(r[3]) for label, r in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--aux", type=int, default=2)
    parser.add_argument("--sizes", default="160x256,512x640")
    parser.add_argument("--fusions", default=",".join(FUSIONS))
    parser.add_argument("--step-backbones", default="mit_b0,mit_b2")
    parser.add_argument("--step-fusions", default="cmx,add")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    model = dataclasses.replace(p.model, pretrained=None, compile=False)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), aux channels {args.aux}, "
          f"fpn_channels {model.fpn_channels}, batch {p.train.batch_size} at {model.min_size}x{model.max_size}")
    if not args.skip_sizes:
        fusions = [f for f in args.fusions.split(",") if f]
        unknown = set(fusions) - set(FUSIONS)
        if unknown:
            parser.error(f"unknown fusion(s) {', '.join(sorted(unknown))}; choose from {', '.join(FUSIONS)}")
        size_table(model, args.aux, sizes, fusions)
    print()
    print("| backbone | fusion | rgb s/step | rgbx s/step | ratio |")
    print("|---|---|---:|---:|---:|")
    for backbone in filter(None, args.step_backbones.split(",")):
        for fusion in filter(None, args.step_fusions.split(",")):
            t = step_times(backbone, model, p.train, args.aux, args.steps, fusion)
            rgbx = t[f"rgbx {fusion}"]
            print(f"| {backbone} | {fusion} | {t['rgb']:.3f} | {rgbx:.3f} | {rgbx / t['rgb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
