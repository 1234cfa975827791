"""Benchmark: the evaluate stages one at a time against side by side, as `make repro` runs them (each latency timed
in a quiet window while the others wait at their next batch), interleaved in one run.

Each round forces every evaluate stage (`dvc repro --force --single-item evaluate_<b>`) in each mode and prints the
wall time and what each stage wrote to eval.json: ms/image, the share of its core the timing got, busy. Run it in
a project whose train stages are up to date (after `make repro`), with the venv first on PATH (the stages run
`python`, as under `make repro`); the stages' own output goes to --log.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python bench/bench_eval_lanes.py [--rounds 2] [--lanes 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from mitdet.engine.quiet import ENV
from mitdet.params import load_params
from mitdet.repro import QUIET_LOCK, run_side_by_side


def one_mode(backbones: list[str], lanes: int, dvc: str) -> tuple[float, dict]:
    """(wall seconds, backbone -> (ms/image, speed_cpu_share, busy)) of forcing every evaluate stage, `lanes` at once."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if lanes > 1:
        env[ENV] = os.path.abspath(QUIET_LOCK)
    commands = {f"evaluate_{b}": [dvc, "--wait-for-lock", "repro", "--force", "--single-item", f"evaluate_{b}"]
                for b in backbones}
    start = time.perf_counter()
    codes = run_side_by_side(commands, lanes, env)
    seconds = time.perf_counter() - start
    if any(codes.values()):
        raise SystemExit(f"a stage failed: {codes} (see the log)")
    out = {}
    for b in backbones:
        metrics = json.loads(open(f"metrics/{b}/eval.json").read())
        out[b] = (metrics["ms_per_image"], metrics["machine"]["speed_cpu_share"], metrics["machine"]["busy"])
    return seconds, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--dvc", default=os.path.join(os.path.dirname(sys.executable), "dvc"))
    ap.add_argument("--log", default="/tmp/bench_eval_lanes.log")
    args = ap.parse_args(argv)
    backbones = load_params("params.yaml").backbones
    results = []
    with open(args.log, "w") as log:
        for r in range(args.rounds):
            for lanes in (1, args.lanes):
                with contextlib.redirect_stdout(log):
                    seconds, stages = one_mode(backbones, lanes, args.dvc)
                results.append((r, lanes, seconds, stages))
                print(f"round {r + 1}, {lanes} at a time: {seconds:.1f} s", flush=True)
                for b, (ms, share, busy) in stages.items():
                    print(f"  {b}: {ms:.1f} ms/image, core share {share}, busy {busy}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
