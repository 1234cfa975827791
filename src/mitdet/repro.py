"""`make repro`: `dvc repro` with the train stages side by side, as many as the cores hold.

DVC runs one stage at a time, and its documented way to run independent stages in parallel is one `dvc repro` per
stage (the repository lock is released while a stage's command runs; `--wait-for-lock` queues the short locked
parts). So: the data stages first (when stale), then each stale `train_<b>` in its own `dvc repro --single-item` (at most
`train_lanes` at once), then a plain `dvc repro` for the rest. Evaluation runs alone after training, so the
latencies it writes are not measured beside a trainer.

    python -m mitdet.repro [--lanes N] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from mitdet.params import Params, TrainParams, load_params
from mitdet.runtime import usable_cores

DATA_STAGES = ("prepare_data", "build_index")  # before training: every train stage reads the index


def cores_per_stage(train: TrainParams, cores: int) -> int:
    """The cores one train stage keeps busy: its compute threads (0: all) and loader workers, per process."""
    threads = train.threads if train.threads > 0 else cores
    return train.nproc_per_node * (threads + train.num_workers)


def train_lanes(params: Params, cores: int, accelerator: bool) -> int:
    """How many train stages to run at once: 1 on an accelerator (they would share it), else as many as fit in
    `cores` at each backbone's threads + workers."""
    if accelerator or not params.backbones:
        return 1
    need = max(cores_per_stage(params.train.for_backbone(b), cores) for b in params.backbones)
    return max(1, min(len(params.backbones), cores // need))


def uses_accelerator(params: Params) -> bool:
    """Whether a train stage would run on a GPU (or MPS): `device: cuda|mps`, or `auto` where one is present."""
    devices = {params.train.for_backbone(b).device for b in params.backbones}
    if devices & {"cuda", "mps"}:
        return True
    if "auto" not in devices:
        return False
    from mitdet.engine.device import resolve_device  # imports torch: only when something is to train
    return resolve_device("auto").type != "cpu"


def stale_train_stages(status: dict, backbones: list[str]) -> list[str]:
    """The train stages `dvc status --json` reports changed, in `backbones:` order."""
    return [f"train_{b}" for b in backbones if f"train_{b}" in status]


def _relay(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> int:
    """Copy `proc`'s output to ours line by line, each line after `prefix`; its exit code."""
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()
    return proc.wait()


def run_side_by_side(commands: dict[str, list[str]], lanes: int) -> dict[str, int]:
    """Run each named command, at most `lanes` at once, its output lines prefixed with its name; name -> exit code."""
    lock = threading.Lock()
    width = max((len(n) for n in commands), default=0)

    def one(name: str) -> int:
        proc = subprocess.Popen(commands[name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        return _relay(proc, f"{name:<{width}} | ", lock)

    with ThreadPoolExecutor(max(1, lanes)) as pool:
        return dict(zip(commands, pool.map(one, commands), strict=True))


def dvc_status(dvc: str) -> dict | None:
    """`dvc status --json`: stage name -> its changes; None when DVC fails (a plain `dvc repro` then says why)."""
    status = subprocess.run([dvc, "status", "--json"], capture_output=True, text=True)
    if status.returncode:
        return None
    return json.loads(status.stdout or "{}")


def repro(params: Params, lanes: int | None = None, dvc: str = "dvc") -> int:
    """The data stages, the stale train stages side by side, then everything else; the first failure's code."""
    status = dvc_status(dvc)
    if status is not None and set(status) & set(DATA_STAGES):
        code = subprocess.call([dvc, "repro", DATA_STAGES[-1]])
        if code:
            return code
        status = dvc_status(dvc)
    if status is None:
        return subprocess.call([dvc, "repro"])
    stale = stale_train_stages(status, params.backbones)
    if len(stale) > 1 and lanes is None:
        lanes = train_lanes(params, usable_cores(), uses_accelerator(params))
    if len(stale) > 1 and lanes > 1:
        print(f"training {', '.join(stale)}: {min(lanes, len(stale))} at a time", flush=True)
        codes = run_side_by_side({s: [dvc, "--wait-for-lock", "repro", "--single-item", s] for s in stale}, lanes)
        failed = [s for s, c in codes.items() if c]
        if failed:
            print(f"error: {', '.join(failed)} failed (output above, prefixed with the stage name); fix it and "
                  "run `make repro` again", file=sys.stderr)
            return codes[failed[0]]
    return subprocess.call([dvc, "repro"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--lanes", type=int, default=None,
                        help="train stages at once (default: the cores over each stage's threads + workers)")
    parser.add_argument("--dvc", default="dvc", help="the dvc executable")
    args = parser.parse_args(argv)
    if args.lanes is not None and args.lanes < 1:
        parser.error(f"--lanes must be at least 1, not {args.lanes}")
    try:
        return repro(load_params(args.params), args.lanes, args.dvc)
    except KeyboardInterrupt:  # Ctrl-C reached the stages too: each train stage saved last.pt and stopped
        print("interrupted: `make repro` again resumes each train stage from its last.pt", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from mitdet.stage import run  # a bad params.yaml: one `error:` line, no traceback
    run(main)
