"""mit_b0 training step time by thread count, OpenMP wait policy and a competing process; and by loader workers.

    .venv/bin/python bench/bench_threads.py [--steps 3] [--loader-steps 6] [--batch 8] [--rounds 2] [--only policy,loader]

`policy`: threads 1 and 2, OMP_WAIT_POLICY=PASSIVE or unset (OpenMP's own, spinning), idle and beside a
`while True: pass` process, interleaved rounds, on seeded random batches. `loader`: the real training loader
over a small generated synthetic index, `train.num_workers` 0/1/2 at 1 thread and 0/2 at 2 threads, each step
timed with its wait for data. Each configuration runs in its own subprocess; BENCHMARKS.md holds figures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reproducible import ROOT, Busy, child, run_child  # noqa: E402
from mitdet import runtime  # noqa: E402

PASSIVE = {}                            # configure_cpu's own default
SPINNING = {"OMP_WAIT_POLICY": None}    # unset: OpenMP's default policy


def loader_steps(cfg: dict) -> dict:
    """Train mit_b0 on the real training loader; median seconds per step including the wait for data."""
    import torch
    from mitdet.data.dataset import build_loader
    from mitdet.data.index import load_split
    from mitdet.engine.optim import build_optimizer
    from mitdet.models import build_detector
    from mitdet.params import load_params
    runtime.apply_threads(cfg["threads"])
    params = load_params(ROOT / "params.yaml")
    train = params.train.for_backbone("mit_b0")
    loader = build_loader(load_split(Path(cfg["root"]) / "data/index", "train", root=cfg["root"]), model=params.model, train=train, seed=0,
                          training=True, batch_size=cfg["batch"], num_workers=cfg["workers"])
    torch.manual_seed(0)
    model = build_detector("mit_b0", 9, params.model)
    optimizer = build_optimizer(model, train)
    model.train()
    times, last = [], time.perf_counter()
    for step, (images, targets, _) in enumerate(loader):
        loss = sum(model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if step >= cfg["steps"]:
            break
    return {"s_per_step": statistics.median(times[1:]), "machine": runtime.machine_info("cpu")}


def loader_child(cfg: dict) -> None:
    """configure_cpu before torch, then the loader run."""
    runtime.configure_cpu(cfg["threads"], False)
    print(json.dumps(loader_steps(cfg)), flush=True)


def make_index(root: Path, images: int) -> None:
    """A small synthetic dataset (params.yaml's generator settings) and its index under `root`."""
    from mitdet.data.build_index import build_index
    from mitdet.data.sources import prepare
    from mitdet.params import load_params
    params = load_params(ROOT / "params.yaml")
    synthetic = dataclasses.replace(params.data.synthetic, train_images=images, val_images=2)
    prepare(dataclasses.replace(params.data, source="synthetic", synthetic=synthetic), params.seed, root=root)
    build_index(root / "data/raw/manifest.json", params.index, root / "data/index", root=root)


def policy_plan(args) -> list[dict]:
    """Interleaved rounds of threads x wait policy x load."""
    runs = []
    for r in range(args.rounds):
        for busy in (False, True):
            for t in (1, 2):
                for policy, env in (("passive", PASSIVE), ("spinning", SPINNING)):
                    runs.append({"name": f"t{t} {policy} {'busy' if busy else 'idle'}", "threads": t,
                                 "reproducible": False, "env": env, "busy": busy, "round": r,
                                 "steps": args.steps, "batch": args.batch})
    return runs


def loader_plan(args, root: str) -> list[dict]:
    """Interleaved rounds of (threads, workers) on the real loader."""
    combos = ((1, 0), (1, 1), (1, 2), (2, 0), (2, 2))
    return [{"name": f"t{t} workers {w}", "threads": t, "workers": w, "root": root, "round": r, "loader": True,
             "steps": args.loader_steps, "batch": args.batch} for r in range(args.rounds) for t, w in combos]


def run_plan(runs: list[dict]) -> list[dict]:
    """Each run in its own subprocess (beside a busy process where asked); one printed row per run."""
    rows = []
    for cfg in runs:
        with Busy() if cfg.get("busy") else contextlib.nullcontext():
            row = run_child(cfg, script=__file__)
        rows.append(row)
        m = row.get("machine", {})
        print(f"round {cfg['round']} {cfg['name']:22} {row.get('s_per_step', float('nan')):6.2f} s/step "
              f"threads {m.get('threads')} wait {m.get('env', {}).get('OMP_WAIT_POLICY', 'unset'):8} "
              f"load {os.getloadavg()[0]:.2f} {row.get('error', '')}", flush=True)
    return rows


def ratios(rows: list[dict], base: str, names: list[str]) -> None:
    """Median over rounds of each named run's step time over `base`'s in the same round."""
    by = {(r["name"], r["round"]): r["s_per_step"] for r in rows if "s_per_step" in r}
    print(f"\nstep time relative to `{base}` (same round; median over rounds), and its median s/step:")
    for name in names:
        x = [by[(name, r)] / by[(base, r)] for (n, r) in by if n == name and (base, r) in by]
        s = [by[(name, r)] for (n, r) in by if n == name]
        if x:
            print(f"  {name:22} {statistics.median(x):5.2f}x   {statistics.median(s):6.2f} s/step")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loader-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="policy,loader")
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        if cfg.get("loader"):
            loader_child(cfg)
        else:
            child(cfg)
        return 0
    return run_all(args)


def run_all(args) -> int:
    """The policy rounds, then the loader rounds, each followed by its ratios."""
    start = time.time()
    print(f"cpu: {runtime.cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; mit_b0 batch "
          f"{args.batch} at params.yaml's input size")
    rows = []
    if "policy" in args.only:
        rows += run_plan(policy_plan(args))
        ratios(rows, "t1 passive idle", sorted({r["name"] for r in rows}))
    if "loader" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            make_index(Path(tmp), images=args.batch * (args.loader_steps + 2))
            loader_rows = run_plan(loader_plan(args, tmp))
        ratios(loader_rows, "t1 workers 0", [r["name"] for r in loader_rows[:5]])
        rows += loader_rows
    print(f"\n{len(rows)} runs in {time.time() - start:.0f} s")
    return 0 if all("s_per_step" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
