"""Bitwise reproducibility of a short mit_b0 training across thread counts, kernel levels and load; its cost.

    .venv/bin/python bench/bench_reproducible.py [--steps 6] [--batch 4] [--rounds 2] [--only threads,levels,load]

Each configuration trains in its own subprocess (the env applies at torch import): the real detector and
optimizer at params.yaml's input size on seeded random images, then a SHA-256 of the final weights. Prints one
row per run and a summary of which runs agree; BENCHMARKS.md ("Reproducibility and threads") holds figures.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from mitdet import runtime  # noqa: E402  (no torch: the parent never computes)

LEVELS = {  # a CPU of each level, stood in for by pinning PyTorch and oneDNN to it (MKL: portable's COMPATIBLE)
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}

VARIANTS = {"default": False, "avx2": "avx2", "portable": "portable"}  # reproducible levels, timed in rounds


# ----------------------------------------------------------------------------------------------- child side
def weights_hash(state: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    import torch
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_steps(cfg: dict) -> dict:
    """Train mit_b0 `cfg["steps"]` steps on seeded random batches; losses, median s/step, weights hash."""
    import torch
    from bench_train_step import batch
    from mitdet.engine.optim import build_optimizer
    from mitdet.models import build_detector
    from mitdet.params import load_params
    runtime.apply_threads(cfg["threads"])
    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    model = build_detector("mit_b0", 9, params.model)
    optimizer = build_optimizer(model, params.train.for_backbone("mit_b0"))
    gen, losses, times, cpu = torch.Generator().manual_seed(1), [], [], []
    model.train()
    for _ in range(cfg["steps"]):
        images, targets = batch(cfg["batch"], params.model.min_size, params.model.max_size, gen)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # all threads' CPU time: less swayed by other jobs
        losses.append(float(loss))
    if cfg.get("save"):
        torch.save(model.state_dict(), cfg["save"])
    return {"hash": weights_hash(model.state_dict()), "loss_first": losses[0], "loss_last": losses[-1],
            "s_per_step": statistics.median(times[1:] or times),
            "cpu_s_per_step": statistics.median(cpu[1:] or cpu), "machine": runtime.machine_info("cpu")}


def child(cfg: dict) -> None:
    """Set the env (configure_cpu, then the config's overrides; None unsets) before torch, then train."""
    runtime.configure_cpu(cfg["threads"], cfg["reproducible"])
    for key, value in cfg.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    print(json.dumps(train_steps(cfg)), flush=True)


# ---------------------------------------------------------------------------------------------- parent side
def run_child(cfg: dict, script: str = __file__, timeout: float = 600) -> dict:
    """One configuration in a fresh interpreter; its result row (or an `error`)."""
    env = {k: v for k, v in os.environ.items() if k not in runtime.ENV_KEYS}  # each config starts clean
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1:]}
    return {**cfg, **json.loads(proc.stdout.strip().splitlines()[-1])}


class Busy:
    """A competing CPU-bound process for the duration of a `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def plan(args) -> list[dict]:
    """Every configuration: interleaved rounds of threads x VARIANTS, then the levels, then one run under load."""
    base = {"steps": args.steps, "batch": args.batch, "env": {}}
    runs = []
    if "threads" in args.only:
        for r in range(args.rounds):
            runs += [{**base, "name": f"{variant} t{t}", "threads": t, "reproducible": level, "round": r}
                     for t in (1, 2) for variant, level in VARIANTS.items()]
    if "levels" in args.only:
        runs += level_runs(base)
    if "load" in args.only:
        runs.append({**base, "name": "portable t2 busy", "threads": 2, "reproducible": "portable", "busy": True})
    return runs


def level_runs(base: dict) -> list[dict]:
    """At 1 thread, portable pins: each level the CPU has; then the avx2 level with one library left to itself."""
    best = runtime.best_cpu_level()
    have = [lv for lv in LEVELS if list(LEVELS).index(lv) <= list(LEVELS).index(best)]
    one = {**base, "threads": 1, "reproducible": "portable"}
    runs = [{**one, "name": f"level {lv}", "env": LEVELS[lv]} for lv in have]
    for name, env in (("portable but ATen native", {"ATEN_CPU_CAPABILITY": None}),
                      ("portable but oneDNN native", {"ONEDNN_MAX_CPU_ISA": None}),
                      ("portable but MKL_CBWR unset", {"MKL_CBWR": None}),
                      ("portable but MKL_CBWR=AUTO", {"MKL_CBWR": "AUTO"}),
                      ("portable but MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"})):
        runs.append({**one, "name": name, "env": env})
    runs.append({**base, "name": "unpinned native", "threads": 1, "reproducible": False})
    return runs


def max_diff(a: str, b: str) -> float:
    """Largest absolute difference between two saved state dicts."""
    import torch
    sa, sb = torch.load(a), torch.load(b)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def report(rows: list[dict], ref_of) -> None:
    """Group runs by weights hash; each row's largest weight difference from its reference run."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row.get("hash", "error"), []).append(row["name"])
    print("\nruns with bitwise-equal weights:")
    for h, names in groups.items():
        print(f"  {h[:12]}: {', '.join(names)}")
    print("\nlargest |weight difference| from the reference run (first run of each name):")
    seen = set()
    for row in rows:
        ref = ref_of(row)
        if ref is not None and "hash" in row and row["name"] not in seen | {ref["name"]}:
            seen.add(row["name"])
            print(f"  {row['name']:26} vs {ref['name']:14} {max_diff(row['save'], ref['save']):.3e}")


def reference(rows: list[dict]):
    """Each row's reference: the first `<level> t1` run of its reproducible level (`level avx2` for portable)."""
    first = {row["name"]: row for row in reversed(rows) if "hash" in row}
    refs = {False: first.get("default t1", first.get("unpinned native")), "avx2": first.get("avx2 t1"),
            "portable": first.get("portable t1", first.get("level avx2"))}
    return lambda row: refs.get(row["reproducible"])


def timing(rows: list[dict]) -> None:
    """Wall and CPU time per step of each pinned variant over default, same thread count and round."""
    by = {(row["name"], row.get("round")): row for row in rows if "hash" in row}
    for t in (1, 2):
        for variant in list(VARIANTS)[1:]:
            pairs = [(by[(f"default t{t}", r)], by[(f"{variant} t{t}", r)])
                     for (name, r) in by if name == f"default t{t}" and (f"{variant} t{t}", r) in by]
            for key in ("s_per_step", "cpu_s_per_step"):
                x = [b[key] / a[key] for a, b in pairs]
                if x:
                    print(f"threads {t}: {variant}/default {key} per round: {', '.join(f'{v:.2f}' for v in x)} "
                          f"(median {statistics.median(x):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="threads,levels,load")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    return run_all(args)


def run_all(args) -> int:
    """Run the plan, printing a row per run, then the summaries."""
    start = time.time()
    print(f"cpu: {runtime.cpu_model()}, best level {runtime.best_cpu_level()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; mit_b0, {args.steps} steps of batch {args.batch}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg in enumerate(plan(args)):
            cfg["save"] = str(Path(tmp) / f"{i}.pt")
            with Busy() if cfg.get("busy") else contextlib.nullcontext():
                row = run_child(cfg)
            rows.append(row)
            m = row.get("machine", {})
            print(f"{row['name']:26} {row.get('hash', 'ERROR ' + str(row.get('error')))[:12]} "
                  f"loss {row.get('loss_last', float('nan')):.6f} {row.get('s_per_step', float('nan')):.2f} s/step "
                  f"{row.get('cpu_s_per_step', float('nan')):.2f} cpu-s/step "
                  f"capability {m.get('cpu_capability')} threads {m.get('threads')} load {os.getloadavg()[0]:.2f}",
                  flush=True)
        report(rows, reference(rows))
        timing(rows)
    print(f"\n{len(rows)} runs in {time.time() - start:.0f} s")
    return 0 if all("hash" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
