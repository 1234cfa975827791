"""Does fusion work? RGB-only against RGB+X on the synthetic thermal data, same budget, per-class AP.

The synthetic data with `data.synthetic.aux: thermal` has warm/cold twins of three classes that look the same in
RGB and differ only in the thermal image: an RGB-only model can only guess the twin, RGB+X can read it. Both runs
use the same index (index.aux_channels 1; model.modality rgb ignores the aux image), the same seed, steps and
data; each runs the real stage scripts in its own temporary project.

    .venv/bin/python bench/bench_rgbx_learning.py                      # the BENCHMARKS.md figures
    .venv/bin/python bench/bench_rgbx_learning.py --fusions cmx add concat --epochs 4
    .venv/bin/python bench/bench_rgbx_learning.py --set model.min_size=112 model.max_size=160
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TWIN_SUFFIXES = ("_warm", "_cold")


def set_key(doc: dict, dotted: str, value) -> None:
    """doc[a][b][c] = value for dotted 'a.b.c' (the key must exist: params.yaml holds every key)."""
    *parents, last = dotted.split(".")
    for part in parents:
        doc = doc[part]
    if last not in doc:
        raise KeyError(f"params.yaml has no key {dotted}")
    doc[last] = value


def write_params(path: Path, overrides: dict) -> None:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        set_key(doc, key, value)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_stage(project: Path, script: str, *args: str) -> float:
    """Run stages/<script>.py in `project`; return its wall time (raises with its output on failure)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "stages" / f"{script}.py"), *args], cwd=project, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def base_overrides(args) -> dict:
    return {
        "backbones": ["mit_b0"], "train.per_backbone": {"mit_b0": {}},
        "data.synthetic.aux": "thermal", "data.synthetic.train_images": args.train_images,
        "data.synthetic.val_images": args.val_images, "index.aux_channels": 1,
        "train.epochs": args.epochs, "train.val.interval": 0, "train.quick_eval.interval": 0,
        "train.threads": args.threads, "evaluate.threads": args.threads,
        "evaluate.samples": 0, "evaluate.speed_images": 2, "evaluate.speed_warmup": 1,
    }


def one_run(data_project: Path, work: Path, name: str, overrides: dict) -> dict:
    """Train and evaluate mit_b0 with `overrides` on the data of `data_project`; return its figures."""
    project = work / name
    project.mkdir()
    (project / "data").mkdir()
    for part in ("raw", "index"):
        os.symlink(data_project / "data" / part, project / "data" / part)
    write_params(project / "params.yaml", overrides)
    train_s = run_stage(project, "train", "--backbone", "mit_b0")
    run_stage(project, "evaluate", "--backbone", "mit_b0")
    per_class = json.loads((project / "metrics/mit_b0/per_class.json").read_text())
    scores = json.loads((project / "metrics/mit_b0/eval.json").read_text())
    twins = {c: v["AP"] for c, v in per_class.items() if c.endswith(TWIN_SUFFIXES)}
    others = {c: v["AP"] for c, v in per_class.items() if not c.endswith(TWIN_SUFFIXES)}
    return {"name": name, "train_s": round(train_s, 1), "AP": scores["AP"], "AP50": scores["AP50"],
            "twin_AP": _mean(twins), "other_AP": _mean(others),
            "per_class_AP": {c: None if v["AP"] is None else round(v["AP"], 4) for c, v in per_class.items()}}


def _mean(values: dict) -> float | None:
    got = [v for v in values.values() if v is not None]
    return round(sum(got) / len(got), 4) if got else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fusions", nargs="+", default=["cmx"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more params overrides for every run, YAML values (e.g. model.min_size=128)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    base = base_overrides(args)
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory(prefix="rgbx-learning-") as tmp:
        work = Path(tmp)
        data = work / "data_project"
        data.mkdir()
        write_params(data / "params.yaml", base)
        run_stage(data, "prepare_data")
        run_stage(data, "build_index")
        results = [one_run(data, work, "rgb", {**base, "model.modality": "rgb"})]
        for fusion in args.fusions:
            results.append(one_run(data, work, f"rgbx-{fusion}", {**base, "model.modality": "rgbx",
                                                                    "model.fusion": fusion}))
        shutil.rmtree(work, ignore_errors=True)
    print(f"mit_b0, {args.train_images} train / {args.val_images} val synthetic thermal images, {args.epochs} "
          f"epochs, {args.threads} thread(s)")
    print(f"{'run':14s} {'AP':>6s} {'AP50':>6s} {'twin AP':>8s} {'other AP':>9s} {'train s':>8s}")
    for r in results:
        print(f"{r['name']:14s} {r['AP']:6.3f} {r['AP50']:6.3f} {r['twin_AP'] or 0:8.3f} {r['other_AP'] or 0:9.3f} "
              f"{r['train_s']:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
