"""Stage overhead (issue 21): where an evaluate_<backbone> run's time goes, and a no-op `dvc repro`.

    python bench/bench_stage_overhead.py --root DIR [--backbone mit_b0] [--runs 3]
    python bench/bench_stage_overhead.py --dvc-noop [--runs 5] [--raw DIR] [--extra-path DIR]

--dvc-noop clones this checkout into a temporary folder, puts a stand-in for every output dvc.yaml declares
(`--raw`: a real data/raw to copy, e.g. one prepare_data made; else one small file per output), records them with
`dvc commit -f`, checks `dvc status` is clean, then times `dvc repro` and `dvc status` with nothing to do, `--runs`
times each, and `dvc version` (DVC's own start-up). `--extra-path` goes first on PYTHONPATH for an A/B run (e.g. a
folder with ruamel.yaml.clib's `_ruamel_yaml` extension unpacked), interleaved with the plain runs.

The evaluate mode:

DIR is a project folder with params.yaml, data/index/ (+ the images it names) and models/<b>/; the outputs
(metrics/, plots/, data/predictions/) are written there, so use a scratch copy, e.g.:

    mkdir /tmp/ev && cd /tmp/ev && cp /work/main/params.yaml . && mkdir models && cp -r /work/main/models/mit_b0 models/
    PYTHONPATH=/work/main/src python /work/main/stages/prepare_data.py && PYTHONPATH=... python .../build_index.py

Each phase is timed by wrapping the names evaluate.py calls; "stage" is the whole evaluate_backbone call and
"predict" the prediction pass, so stage / predict is the 1.2x goal of issue 21. Threads and the reproducible
level are params.evaluate's, set before torch is imported, as the stage does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def declared_outputs(dvc_yaml: dict, work: Path) -> list[Path]:
    """Every outs/metrics/plots path of dvc.yaml's stages, under `work`."""
    return [work / (next(iter(out)) if isinstance(out, dict) else out) for stage in dvc_yaml["stages"].values()
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]


def dvc_noop(runs: int, raw: str | None, extra_path: str | None) -> int:
    import shutil
    import subprocess
    import tempfile

    import yaml

    repo = Path(__file__).resolve().parents[1]
    dvc = str(Path(sys.executable).with_name("dvc"))
    work = Path(tempfile.mkdtemp(prefix="noop-")) / "project"
    subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True)
    if raw:
        shutil.copytree(raw, work / "data" / "raw", dirs_exist_ok=True)
    for path in declared_outputs(yaml.safe_load((work / "dvc.yaml").read_text()), work):
        if path.exists():
            continue
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if path.suffix == ".json" else "a\n")
        else:  # a folder output: one file in it
            path.mkdir(parents=True, exist_ok=True)
            (path / "stand_in.txt").write_text("a\n")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([dvc, "commit", "-f", "-q"], cwd=work, env=env, check=True, capture_output=True)
    status = subprocess.run([dvc, "status", "-q"], cwd=work, env=env, capture_output=True, text=True)
    if status.returncode != 0 or status.stdout.strip():
        print(f"dvc status is not clean in {work}:\n{status.stdout[-3000:]}", file=sys.stderr)
        return 1
    variants = {"plain": {k: v for k, v in env.items() if k != "PYTHONPATH"}}
    if extra_path:
        variants["extra-path"] = dict(variants["plain"], PYTHONPATH=extra_path)
    times: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, venv in variants.items():
            for cmd in ("repro", "status"):
                t = time.perf_counter()
                subprocess.run([dvc, cmd, "-q"], cwd=work, env=venv, check=True, capture_output=True)
                times.setdefault(f"dvc {cmd} ({name})", []).append(time.perf_counter() - t)
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([dvc, "version", "-q"], cwd=work, env=variants["plain"], check=True, capture_output=True)
        times.setdefault("dvc version", []).append(time.perf_counter() - t)
    for label, vals in times.items():
        print(f"{label:28s} " + " ".join(f"{v:5.2f}" for v in vals) + f"   median {statistics.median(vals):.2f} s")
    print(f"load average {os.getloadavg()[0]:.1f}; project copy: {work}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root")
    ap.add_argument("--backbone", default="mit_b0")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dvc-noop", action="store_true")
    ap.add_argument("--raw")
    ap.add_argument("--extra-path")
    args = ap.parse_args()
    if args.dvc_noop:
        return dvc_noop(args.runs, args.raw, args.extra_path)
    if not args.root:
        ap.error("--root is required (or --dvc-noop)")
    os.chdir(args.root)

    from mitdet import stage
    params = stage.load_params("params.yaml")
    stage.prepare_cpu(params.evaluate.threads, params.evaluate.reproducible)
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from mitdet.engine import evaluate as ev
    import mitdet.models as models
    print(f"imports (torch + mitdet.engine.evaluate): {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    times: dict[str, list[float]] = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - t)
        setattr(owner, name, wrapper)

    timed(ev, "load_evaluated_model", "load model")
    timed(ev.SplitRun, "predict", "predict")
    timed(ev, "score", "score")
    timed(ev, "measure_speed", "speed (timed passes)")
    timed(ev.SplitRun, "speed_images", "speed (loading images)")
    timed(models, "detector_gflops", "gflops")
    timed(ev, "write_samples", "samples")
    timed(ev, "write_json", "write_json")
    timed(ev, "machine_with_load_warning", "machine info")
    import contextlib
    import io
    figures = []
    for _ in range(args.runs):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            m = ev.evaluate_backbone(args.backbone, params.evaluate, inference=params.model, seed=params.seed,
                                     progress=False)
        times.setdefault("stage", []).append(time.perf_counter() - t)
        figures.append((m["ms_per_image"], m["gflops"], m["AP"]))
    print(f"{'phase':26s} " + " ".join(f"run{i + 1:>5d}" for i in range(args.runs)) + "   median", file=sys.stderr)
    for label, vals in times.items():
        # a phase called more than once per run (write_json) is summed per run
        per_run = [sum(vals[i::args.runs]) for i in range(args.runs)] if len(vals) != args.runs else vals
        if len(vals) > args.runs:
            k = len(vals) // args.runs
            per_run = [sum(vals[i * k:(i + 1) * k]) for i in range(args.runs)]
        print(f"{label:26s} " + " ".join(f"{v:8.2f}" for v in per_run) + f" {statistics.median(per_run):8.2f}",
              file=sys.stderr)
    stage_s, pred_s = statistics.median(times["stage"]), statistics.median(times["predict"])
    print(f"stage / predict: {stage_s / pred_s:.2f}x", file=sys.stderr)
    for ms, gf, ap_ in figures:
        print(f"ms_per_image {ms if ms is None else round(ms, 2)}  gflops {gf:.4f}  AP {ap_}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
