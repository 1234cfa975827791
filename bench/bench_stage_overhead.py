"""Where an evaluate_<backbone> run's time goes, phase by phase, in one process (imports excluded).

    python bench/bench_stage_overhead.py --root DIR [--backbone mit_b0] [--runs 3]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--backbone", default="mit_b0")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
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
