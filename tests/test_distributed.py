"""Two processes on the CPU (gloo) through the stage's own torchrun re-launch, end to end on a tiny index."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from mitdet.engine import checkpoint as ckpt
from mitdet.paths import BackbonePaths
from tests.test_train import B, REPO, read_csv, write_params
from tests.train_fixtures import write_index


def test_two_processes_with_gloo_train_and_only_rank0_writes(tmp_path):
    write_index(tmp_path, n_train=8, n_val=2, size=64)
    write_params(tmp_path, epochs=1, nproc_per_node=2, log_every_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), "--backbone", B], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = BackbonePaths(B)
    result = json.loads((tmp_path / p.train_metrics).read_text())
    # 8 images over 2 ranks at batch 2 each: 2 steps in the epoch, 8 images seen in all
    assert result["world_size"] == 2 and result["steps"] == 2 and result["images_seen"] == 8
    assert proc.stderr.count(f"{B}: 2 steps in") == 1  # one summary line: only rank 0 prints
    assert [r["step"] for r in read_csv(tmp_path / p.train_batches_csv)] == ["1", "2"]
    state = ckpt.load(tmp_path / p.checkpoints / "last.pt")
    assert state["finished"] and state["fingerprint"]["extra"]["world_size"] == 2
    # each rank's own RNG streams and partial sums, restored by that rank on resume (seeded seed + rank)
    assert len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    weights = load_file(tmp_path / p.weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not list(tmp_path.rglob("*.tmp"))
