"""Experimenting the DVC way, on the training side: logs written live (a second process sees them grow; a kill -9
and resume leaves exactly an uninterrupted run's logs), going back to params already trained restores that run,
and evaluation of another checkpoint."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mitdet.engine import checkpoint as ckpt
from mitdet.engine.evaluate import load_evaluated_model
from mitdet.engine.train import train
from mitdet.errors import CheckpointError
from mitdet.paths import BackbonePaths
from tests.test_train import B, REPO, outputs, read_csv, same_weights, without_timing
from tests.train_fixtures import tiny_model, tiny_train, write_index

P = BackbonePaths(B)
# 8 images, batch 2: 4 steps an epoch; a log row every step, last.pt every 5 steps
LIVE = dict(epochs=5, log_every_steps=1, checkpoint={"every_steps": 5}, val={"interval": 1, "max_images": 2})

SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {src!r}]
from tests.train_fixtures import tiny_model, tiny_train
from mitdet.engine.train import train
train({b!r}, tiny_train(**{kw!r}), tiny_model(), seed=0, index_dir={index!r})
"""


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> str:
    return str(write_index(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4, size=64))


def start_training(root: Path, index_dir: str) -> subprocess.Popen:
    """The tiny run of LIVE in another process, in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    code = SCRIPT.format(repo=str(REPO), src=str(REPO / "src"), b=B, kw=LIVE, index=index_dir)
    return subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows_now(root: Path) -> int:
    path = root / P.train_batches_csv
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_logs_and_train_json_grow_while_the_run_goes(tmp_path, index_dir):
    proc = start_training(tmp_path, index_dir)
    seen_rows, seen_steps = set(), set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen_rows.add(rows_now(tmp_path))
        try:
            progress = json.loads((tmp_path / P.train_metrics).read_text())
            if not progress["finished"]:
                seen_steps.add(progress["steps"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass  # not written yet (every write is a rename: never a torn file)
        time.sleep(0.05)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-3000:]
    assert len(seen_rows - {0}) >= 3, seen_rows  # rows appeared one by one, not all at the end
    assert len(seen_steps) >= 3, seen_steps      # train.json's running fields followed the steps
    final = json.loads((tmp_path / P.train_metrics).read_text())
    assert final["finished"] and final["steps"] == 20 and rows_now(tmp_path) == 20


def test_kill_9_and_resume_leave_an_uninterrupted_runs_logs(tmp_path, index_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = start_training(killed, index_dir)
    deadline = time.monotonic() + 300
    while rows_now(killed) < 7 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert 7 <= rows_now(killed) < 20  # killed past the checkpoint of step 5, before the end
    assert ckpt.load(killed / P.checkpoints / "last.pt")["step"] in (5, 10, 15)
    for root in (killed, straight):
        cwd = os.getcwd()
        root.mkdir(exist_ok=True)
        os.chdir(root)
        try:
            result = train(B, tiny_train(**LIVE), tiny_model(), seed=0, index_dir=index_dir)
        finally:
            os.chdir(cwd)
    assert result["resumed_from_step"] == 0
    a, b = outputs(straight), outputs(killed)
    assert same_weights(a.pop("weights"), b.pop("weights"))
    assert a == b and len(a["batches"]) == 20  # rows past the checkpoint were rewritten: no duplicates, no gaps


def test_going_back_to_trained_params_restores_that_run(tmp_path, index_dir, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    first = train(B, tiny_train(epochs=1), tiny_model(), seed=0, index_dir=index_dir)
    first_rows = without_timing(read_csv(P.train_batches_csv))
    weights = load_file(P.weights)
    train(B, tiny_train(epochs=1, lr=3e-3), tiny_model(), seed=0, index_dir=index_dir)
    assert not same_weights(weights, load_file(P.weights))
    calls = []

    def build_model(*args, **kwargs):
        from mitdet.models import build_detector
        calls.append(1)
        return build_detector(*args, **kwargs)

    from mitdet.engine.train import Hooks
    with caplog.at_level(logging.INFO, logger="mitdet"):
        again = train(B, tiny_train(epochs=1), tiny_model(), seed=0, index_dir=index_dir,
                      hooks=Hooks(build_model=build_model, should_stop=lambda s: pytest.fail("it trained")))
    assert any("trained before: restoring" in r.getMessage() for r in caplog.records)
    assert again == first and same_weights(weights, load_file(P.weights))
    assert json.loads(Path(P.train_metrics).read_text()) == json.loads(json.dumps(first))
    assert without_timing(read_csv(P.train_batches_csv)) == first_rows and first_rows  # the first run's logs


def test_finished_runs_kept_are_bounded(tmp_path, index_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for lr in (1e-3, 2e-3, 3e-3):
        train(B, tiny_train(max_steps=1, lr=lr, checkpoint={"keep_finished": 2}), tiny_model(), seed=0,
              index_dir=index_dir)
    stored = list((Path(P.checkpoints) / ckpt.FINISHED_DIR).glob("*.pt"))
    assert len(stored) == 2
    state = ckpt.load(stored[0])
    assert state["finished"] and state["optimizer"] is None and state["final_weights"]


def test_evaluate_scores_the_checkpoint_params_name(tmp_path, index_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(B, tiny_train(epochs=2, val={"interval": 1}, checkpoint={"keep": 2}), tiny_model(), seed=0,
          index_dir=index_dir)
    model_dir = Path(P.model_dir)
    final, _ = load_evaluated_model(model_dir, "final", None, "cpu")
    epoch1, _ = load_evaluated_model(model_dir, "epoch_001", None, "cpu")
    last, _ = load_evaluated_model(model_dir, "last", None, "cpu")
    saved_epoch1 = ckpt.load(model_dir / "checkpoints" / "epoch_001.pt")["model"]
    assert all(torch.equal(v, saved_epoch1[k]) for k, v in epoch1.state_dict().items())
    assert not same_weights(epoch1.state_dict(), last.state_dict())  # (final is best: epoch 1 or 2)
    assert same_weights(last.state_dict(), ckpt.load(model_dir / "checkpoints" / "last.pt")["model"])
    with pytest.raises(CheckpointError, match="epoch_009.pt: no such checkpoint; set evaluate.weights to final"):
        load_evaluated_model(model_dir, "epoch_009", None, "cpu")


def test_inference_settings_apply_to_the_loaded_model(tmp_path, index_dir, monkeypatch):
    import dataclasses
    monkeypatch.chdir(tmp_path)
    train(B, tiny_train(max_steps=1), tiny_model(), seed=0, index_dir=index_dir)
    m = tiny_model()
    inference = dataclasses.replace(m, roi=dataclasses.replace(m.roi, score_thresh=0.4, detections_per_img=3),
                                    rpn=dataclasses.replace(m.rpn, post_nms_top_n_test=7))
    model, _ = load_evaluated_model(Path(P.model_dir), "final", inference, "cpu")
    assert (model.roi_heads.score_thresh, model.roi_heads.detections_per_img) == (0.4, 3)
    assert model.rpn.post_nms_top_n() == 7
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert len(out["scores"]) <= 3 and bool((out["scores"] >= 0.4).all())
