"""Benchmark: mitdet's detector against a naive build of the same model, training steps interleaved in one run.

    .venv/bin/python bench/bench_naive.py [--backbones mit_b0,mit_b2] [--steps 4] [--threads 1]

The naive build is what one would assemble from the libraries: Hugging Face's `SegformerModel` (transformers, a
test dependency here) as the encoder, torchvision's FPN and Faster R-CNN with every setting of params.yaml
(sizes, anchors, RPN and RoI sampling, box head), torchvision's RoIAlign. Both train on the same random images
with a few boxes; the table gives the median seconds per step of each and their ratio.
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

from bench_train_step import batch  # noqa: E402
from mitdet.engine.optim import build_optimizer  # noqa: E402
from mitdet.models import build_detector  # noqa: E402
from mitdet.models.mit import MIT_CONFIGS  # noqa: E402
from mitdet.params import load_params  # noqa: E402


class HFEncoder(torch.nn.Module):
    """Hugging Face's SegformerModel giving its four stage outputs, as the FPN takes them."""

    def __init__(self, name: str, drop_path_rate: float):
        import transformers
        super().__init__()
        c = MIT_CONFIGS[name]
        config = transformers.SegformerConfig(
            num_channels=3, num_encoder_blocks=4, hidden_sizes=list(c.embed_dims), depths=list(c.depths),
            num_attention_heads=list(c.num_heads), sr_ratios=list(c.sr_ratios), patch_sizes=list(c.patch_sizes),
            strides=list(c.strides), mlp_ratios=[c.mlp_ratio] * 4, hidden_act="gelu", drop_path_rate=drop_path_rate)
        self.model = transformers.SegformerModel(config)
        self.out_channels = list(c.embed_dims)

    def forward(self, x):
        return list(self.model(x, output_hidden_states=True).hidden_states)


def naive_detector(name: str, num_classes: int, model_params):
    """mitdet's Faster R-CNN settings around the Hugging Face encoder and torchvision's own RoIAlign."""
    detector = build_detector(name, num_classes, model_params)
    detector.backbone.body = HFEncoder(name, model_params.drop_path_rate)
    detector.roi_heads.box_roi_pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    return detector


def step_seconds(models: dict, params, name: str, steps: int) -> dict[str, list[float]]:
    train = params.train.for_backbone(name)
    images, targets = batch(train.batch_size, params.model.min_size, params.model.max_size,
                            torch.Generator().manual_seed(0))
    optimizers = {k: build_optimizer(m, train) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps + 1):
        for key, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizers[key].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[key].step()
            if step:  # the first step of each pays one-off allocations
                times[key].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--backbones", default="mit_b0,mit_b2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    print(f"threads={args.threads} input={params.model.min_size}x{params.model.max_size}")
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        models = {"naive": naive_detector(name, 9, params.model), "mitdet": build_detector(name, 9, params.model)}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        times = step_seconds(models, params, name, args.steps)
        naive, ours = statistics.median(times["naive"]), statistics.median(times["mitdet"])
        print(f"{name} (params {counts['mitdet']:,} mitdet, {counts['naive']:,} naive): naive {naive:.3f} s/step, "
              f"mitdet {ours:.3f} s/step, {naive / ours:.2f}x (steps {[round(t, 3) for t in times['naive']]} / "
              f"{[round(t, 3) for t in times['mitdet']]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
