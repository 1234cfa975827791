"""The training loop end to end on a tiny synthetic index: outputs, exact resume, faults, signals, learning."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mitdet.engine import checkpoint as ckpt
from mitdet.engine.monitor import NonFiniteLossError
from mitdet.engine.train import Hooks, Interrupted, train
from mitdet.models import build_detector, load_inference_model
from mitdet.paths import BackbonePaths
from tests.train_fixtures import tiny_model, tiny_train, write_index

REPO = Path(__file__).resolve().parents[1]
TIMING = {"images_per_s", "timestamp", "epoch_seconds", "seconds", "peak_memory_mb", "machine"}
B = "mit_b0"


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def outputs(root: Path) -> dict:
    """What a run leaves, minus wall-clock figures: CSVs, train.json, final weights."""
    p = BackbonePaths(B)
    return {
        "batches": without_timing(read_csv(root / p.train_batches_csv)),
        "epochs": without_timing(read_csv(root / p.train_epochs_csv)),
        "val": read_csv(root / p.val_history_csv),
        "train": {k: v for k, v in json.loads((root / p.train_metrics).read_text()).items()
                  if k not in TIMING | {"resumed_from_step"}},
        "weights": load_file(root / p.weights),
    }


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> str:
    return str(write_index(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4, size=64))


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(root: Path, index_dir: str, train_params, **kw) -> dict:
    cwd = os.getcwd()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    try:
        return train(B, train_params, tiny_model(), seed=0, index_dir=index_dir, **kw)
    finally:
        os.chdir(cwd)


WITH_EVAL = dict(val={"interval": 3, "unit": "steps", "max_images": 3}, quick_eval={"interval": 2, "samples": 2})


def test_a_run_writes_every_declared_output(run_dir, index_dir):
    t = tiny_train(epochs=2, grad_accum=2, tensorboard=True, checkpoint={"every_steps": 1, "keep": 1},
                   val={"interval": 1, "unit": "epochs"})
    result = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    p = BackbonePaths(B)
    ck = Path(p.checkpoints)
    assert {f.name for f in ck.glob("*.pt")} == {"last.pt", "best.pt", "epoch_002.pt"}  # keep: 1
    epoch_ck = ckpt.load(ck / "epoch_002.pt")  # a copy of last.pt as the epoch ended
    assert (epoch_ck["step"], epoch_ck["epoch"], epoch_ck["batch_in_epoch"], epoch_ck["finished"]) == (4, 2, 0, False)
    for path in (p.weights, p.model_json, p.train_metrics, p.train_batches_csv, p.train_epochs_csv,
                 p.val_history_csv):
        assert Path(path).is_file(), path
    assert list(Path(p.model_dir, "tensorboard").glob("*/events.out.tfevents.*"))  # one folder per run
    assert not list(Path(".").rglob("*.tmp"))  # every write went through a rename
    # 8 images / batch 2 = 4 batches per epoch, 2 per optimizer step -> 2 steps per epoch
    assert result["steps"] == 4 and result["total_steps"] == 4 and result["epochs"] == 2.0
    assert result["images_seen"] == 16 and result["nonfinite_steps"] == 0 and result["images_skipped"] == 0
    assert result["weights_from"] == "best" and result["best_epoch"] in (1, 2)
    assert result["params"] > 1_000_000 and result["peak_memory_mb"] > 0
    assert json.loads(Path(p.train_metrics).read_text()) == json.loads(json.dumps(result))

    batches = read_csv(p.train_batches_csv)
    assert list(batches[0]) == ["epoch", "step", "loss", "loss_classifier", "loss_box_reg", "loss_objectness",
                                "loss_rpn_box_reg", "lr", "images_per_s", "timestamp"]
    assert [int(r["step"]) for r in batches] == [2, 4]  # every log_every_steps (2), and the last
    for r in batches:
        parts = sum(float(r[k]) for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"))
        assert float(r["loss"]) == pytest.approx(parts, rel=1e-4)
    epochs = read_csv(p.train_epochs_csv)
    assert list(epochs[0]) == ["epoch", "avg_loss", "epoch_seconds", "lr", "val_AP", "val_AP50", "is_best",
                               "checkpoint", "timestamp"]
    assert [r["epoch"] for r in epochs] == ["1", "2"] and sum(int(r["is_best"]) for r in epochs) >= 1
    val = read_csv(p.val_history_csv)
    assert list(val[0]) == ["step", "epoch", "AP", "AP50", "AP75"] and [r["step"] for r in val] == ["2", "4"]

    spec = json.loads(Path(p.model_json).read_text())
    assert spec["backbone"] == B and spec["num_classes"] == 3 and spec["weights_from"] == "best"
    assert [c["name"] for c in spec["categories"]] == ["square", "disc"]
    best = ckpt.load(ck / "best.pt")
    assert same_weights(load_file(p.weights), {k: v for k, v in best["model"].items() if k in load_file(p.weights)})
    model, _ = load_inference_model(p.model_dir)
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    last = ckpt.load(ck / "last.pt")
    assert last["finished"] and last["step"] == 4 and last["fingerprint"]["hash"]


# mid-epoch (between checkpoints), at an epoch's end, and with a loader worker process
@pytest.mark.parametrize("stop_at,workers", [(3, 0), (4, 0), (5, 1)])
def test_resume_is_bitwise_exact(tmp_path, index_dir, stop_at, workers):
    t = tiny_train(epochs=2, num_workers=workers, **WITH_EVAL)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, index_dir, t)
    with pytest.raises(Interrupted, match=f"interrupted at step {stop_at}: run `dvc repro` again to resume"):
        run(resumed, index_dir, t, hooks=Hooks(should_stop=lambda step: step == stop_at))
    state = ckpt.load(resumed / BackbonePaths(B).checkpoints / "last.pt")
    assert state["step"] == stop_at and not state["finished"]
    assert len(read_csv(resumed / BackbonePaths(B).train_batches_csv)) == stop_at // 2
    result = run(resumed, index_dir, t)
    assert result["resumed_from_step"] == stop_at
    a, b = outputs(straight), outputs(resumed)
    assert same_weights(a.pop("weights"), b.pop("weights"))
    a_last = ckpt.load(straight / BackbonePaths(B).checkpoints / "last.pt")
    b_last = ckpt.load(resumed / BackbonePaths(B).checkpoints / "last.pt")
    assert same_weights(a_last["model"], b_last["model"])  # the last weights too, bitwise
    assert a == b  # CSV rows (but wall-clock columns), validation history, train.json


def test_resume_after_the_last_epoch_before_the_final_validation(tmp_path, index_dir, monkeypatch):
    from mitdet.engine import train as train_mod
    t = tiny_train(epochs=2, **WITH_EVAL)  # 8 steps, validation every 3; the final one (step 8) runs after the loop
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, index_dir, t)
    validate = train_mod.validate

    def dies_at_the_end(model, loader, device, amp, label_to_category, gt, step):
        if step == 8:
            raise RuntimeError("killed during the final validation")
        return validate(model, loader, device, amp, label_to_category, gt, step)

    monkeypatch.setattr(train_mod, "validate", dies_at_the_end)
    with pytest.raises(RuntimeError, match="final validation"):
        run(resumed, index_dir, t)
    monkeypatch.undo()
    state = ckpt.load(resumed / BackbonePaths(B).checkpoints / "last.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["finished"]) == (8, 2, 0, False)
    result = run(resumed, index_dir, t)
    assert result["resumed_from_step"] == 8
    b_last = ckpt.load(resumed / BackbonePaths(B).checkpoints / "last.pt")
    assert b_last["epoch"] == 2 and b_last["finished"]  # not epoch 3: no epoch was left to run
    a, b = outputs(straight), outputs(resumed)
    assert same_weights(a.pop("weights"), b.pop("weights"))
    assert a == b and b["val"][-1]["epoch"] == "2"


def test_same_params_give_the_same_metrics_twice(tmp_path, index_dir):
    t = tiny_train(epochs=1, **WITH_EVAL)
    run(tmp_path / "one", index_dir, t)
    run(tmp_path / "two", index_dir, t)
    a, b = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert same_weights(a.pop("weights"), b.pop("weights"))
    assert a == b and a["val"]


def test_changed_params_set_the_old_run_aside(run_dir, index_dir, caplog):
    with pytest.raises(Interrupted):
        train(B, tiny_train(), tiny_model(), seed=0, index_dir=index_dir, hooks=Hooks(should_stop=lambda s: s == 2))
    ck = Path(BackbonePaths(B).checkpoints)
    with caplog.at_level(logging.WARNING, logger="mitdet"):
        result = train(B, tiny_train(lr=2e-3), tiny_model(), seed=0, index_dir=index_dir)
    assert result["resumed_from_step"] == 0 and result["steps"] == 8
    stale = list(ck.glob("last.pt.stale-*"))
    assert len(stale) == 1 and ckpt.load(stale[0])["step"] == 2
    assert any("train.lr" in r.getMessage() and "training starts fresh" in r.getMessage() for r in caplog.records)


def test_a_finished_run_only_rewrites_its_outputs(run_dir, index_dir, caplog):
    t = tiny_train(epochs=1, val={"interval": 1})
    first = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    before = outputs(run_dir)
    p = BackbonePaths(B)
    for path in (p.weights, p.model_json, p.train_metrics, p.train_batches_csv, p.train_epochs_csv,
                 p.val_history_csv):
        Path(path).unlink()  # what `dvc repro` does to a stage's outputs before running it
    with caplog.at_level(logging.INFO, logger="mitdet"):
        again = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    assert any("finished run" in r.getMessage() for r in caplog.records)
    assert again == first
    after = outputs(run_dir)
    assert same_weights(before.pop("weights"), after.pop("weights")) and before == after


def nan_at(calls: set[int] | Callable):
    """A build_detector whose training loss is NaN on the given forward calls (1-based)."""
    def build_model(*args, **kwargs):
        det = build_detector(*args, **kwargs)
        forward, count = det.forward, [0]

        def patched(images, targets=None):
            out = forward(images, targets)
            if det.training:
                count[0] += 1
                if (calls(count[0]) if callable(calls) else count[0] in calls):
                    out = {k: v * float("nan") for k, v in out.items()}
            return out
        det.forward = patched
        return det
    return build_model


def test_a_nonfinite_loss_step_is_skipped_and_counted(run_dir, index_dir):
    result = train(B, tiny_train(epochs=1), tiny_model(), seed=0, index_dir=index_dir, hooks=Hooks(build_model=nan_at({2})))
    assert result["nonfinite_steps"] == 1 and result["steps"] == 4
    weights = load_file(BackbonePaths(B).weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = read_csv(BackbonePaths(B).train_batches_csv)
    assert all(math.isfinite(float(r["loss"])) for r in rows)  # the skipped step is not averaged in


def test_a_log_window_of_only_nonfinite_steps_logs_no_loss(run_dir, index_dir):
    t = tiny_train(epochs=1, max_nonfinite_steps=3)  # 4 steps, a log row every 2
    result = train(B, t, tiny_model(), seed=0, index_dir=index_dir, hooks=Hooks(build_model=nan_at({1, 2})))
    assert result["nonfinite_steps"] == 2 and result["steps"] == 4
    rows = read_csv(BackbonePaths(B).train_batches_csv)
    assert [r["step"] for r in rows] == ["2", "4"]
    assert rows[0]["loss"] == "" and rows[0]["loss_classifier"] == ""  # empty, not 0.0
    assert math.isfinite(float(rows[1]["loss"])) and float(rows[1]["loss"]) > 0
    epochs = read_csv(BackbonePaths(B).train_epochs_csv)
    assert float(epochs[0]["avg_loss"]) == pytest.approx(float(rows[1]["loss"]), rel=1e-4)  # steps 3-4 only


def test_too_many_nonfinite_steps_stop_keeping_the_last_good_checkpoint(run_dir, index_dir):
    t = tiny_train(epochs=3, max_nonfinite_steps=2, checkpoint={"every_steps": 2})
    with pytest.raises(NonFiniteLossError, match="non-finite 2 optimizer steps in a row.*train.max_nonfinite_steps"):
        train(B, t, tiny_model(), seed=0, index_dir=index_dir, hooks=Hooks(build_model=nan_at(lambda n: n >= 5)))
    state = ckpt.load(Path(BackbonePaths(B).checkpoints) / "last.pt")
    assert state["step"] == 4 and not state["finished"]  # steps 5 and 6 are bad: it stops at 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not Path(BackbonePaths(B).weights).exists()


def write_params(root: Path, index_rel: str = "data/index", **train_overrides) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    m = dataclasses.asdict(tiny_model())
    raw["model"] = m
    raw["backbones"] = [B]
    raw["train"].update({"device": "cpu", "num_workers": 0, "threads": 1, "batch_size": 2, "warmup_steps": 2,
                         "log_every_steps": 1, "per_backbone": {B: {}}, **train_overrides})
    raw["train"]["quick_eval"]["interval"] = 0
    raw["train"]["val"]["interval"] = 0
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sigterm_saves_last_and_exits_with_the_resume_message(tmp_path):
    write_index(tmp_path, n_train=8, n_val=2, size=64)
    write_params(tmp_path, max_steps=500)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "train.py"), "--backbone", B],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    batches = tmp_path / BackbonePaths(B).train_batches_csv
    deadline = time.time() + 120
    while not (batches.exists() and len(read_csv(batches)) >= 2) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    state = ckpt.load(tmp_path / BackbonePaths(B).checkpoints / "last.pt")
    assert last_line == f"interrupted at step {state['step']}: run `dvc repro` again to resume"
    assert 2 <= state["step"] < 500 and not state["finished"]
    assert len(read_csv(batches)) == state["step"]  # log_every_steps 1: the CSV ends where last.pt does


def test_overfit_batches_drive_the_loss_down(run_dir, index_dir):
    t = tiny_train(overfit_batches=1, max_steps=40, lr=2e-3, warmup_steps=5, log_every_steps=5,
                   augment={"hflip": 0.0}, checkpoint={"every_steps": 0})
    result = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    losses = [float(r["loss"]) for r in read_csv(BackbonePaths(B).train_batches_csv)]
    assert result["steps"] == 40 and result["images_seen"] == 80
    assert losses[-1] < 0.4 * losses[0], losses


@pytest.mark.slow
def test_overfit_batches_reach_ap50_above_0_9_on_those_images(run_dir, index_dir):
    t = tiny_train(overfit_batches=1, max_steps=120, lr=1e-3, warmup_steps=20, log_every_steps=20,
                   scheduler="constant", augment={"hflip": 0.0}, checkpoint={"every_steps": 0},
                   val={"interval": 60, "unit": "steps"})
    result = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    val = read_csv(BackbonePaths(B).val_history_csv)
    assert result["best_metric"] > 0.9, val


def test_monitor_alerts_and_early_stopping_rules(caplog):
    from mitdet.engine.monitor import Monitor
    m = Monitor(max_nonfinite=3, monitor="AP50", patience=2, min_delta=0.05)
    with caplog.at_level(logging.WARNING, logger="mitdet"):
        for loss in (1.0, 1.0, 5.0):
            m.loss_logged(loss, step=1)
    assert sum("loss spike" in r.getMessage() for r in caplog.records) == 1
    assert m.validated(0.30, 10, 1) == (True, False)
    assert m.validated(0.33, 20, 2) == (True, False)   # best, but a gain below min_delta: 1 bad
    assert m.validated(0.20, 30, 3) == (False, True)   # 2 bad in a row: stop
    assert (m.best, m.best_step, m.best_epoch) == (0.33, 20, 2)
    with caplog.at_level(logging.WARNING, logger="mitdet"):
        m.validated(0.10, 40, 4)
        m.validated(0.05, 50, 5)
    assert any("got worse 3 times in a row" in r.getMessage() for r in caplog.records)
    state = m.state_dict()
    m2 = Monitor(max_nonfinite=3)
    m2.load_state_dict(state)
    assert m2.state_dict() == state


def test_early_stopping_ends_the_run(run_dir, index_dir):
    t = tiny_train(epochs=3, val={"interval": 1, "unit": "steps", "max_images": 2},
                   early_stopping={"patience": 1, "min_delta": 1.0})  # no validation can gain 1.0 AP50
    result = train(B, t, tiny_model(), seed=0, index_dir=index_dir)
    assert result["early_stopped"] and result["steps"] == 2 and result["weights_from"] == "best"
    assert [r["step"] for r in read_csv(BackbonePaths(B).val_history_csv)] == ["1", "2"]


def test_fingerprint_follows_what_shapes_training(tmp_path, monkeypatch, index_dir):
    pkg = tmp_path / "mitdet"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "data").mkdir()
    for rel in ("__init__.py", "engine/train.py", "report.py", "data/synthetic.py"):
        (pkg / rel).write_text("x = 1\n")
    monkeypatch.setattr(ckpt.mitdet, "__file__", str(pkg / "__init__.py"))
    base = ckpt.code_hash()
    (pkg / "report.py").write_text("x = 2\n")  # not training code
    (pkg / "data" / "synthetic.py").write_text("x = 2\n")
    assert ckpt.code_hash() == base
    (pkg / "engine" / "train.py").write_text("x = 2\n")
    assert ckpt.code_hash() != base
    monkeypatch.undo()

    fp = ckpt.fingerprint(tiny_train(), tiny_model(), 0, index_dir)["hash"]
    assert ckpt.fingerprint(tiny_train(log_every_steps=7, num_workers=3), tiny_model(), 0, index_dir)["hash"] == fp
    assert ckpt.fingerprint(tiny_train(lr=0.5), tiny_model(), 0, index_dir)["hash"] != fp
    assert ckpt.fingerprint(tiny_train(), dataclasses.replace(tiny_model(), min_size=32), 0, index_dir)["hash"] != fp
    assert ckpt.fingerprint(tiny_train(), tiny_model(), 1, index_dir)["hash"] != fp
    copy = tmp_path / "index"
    copy.mkdir()
    for f in Path(index_dir).iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    assert ckpt.fingerprint(tiny_train(), tiny_model(), 0, copy)["hash"] == fp
    with open(copy / "train.jsonl", "a") as f:
        f.write("\n")
    assert ckpt.fingerprint(tiny_train(), tiny_model(), 0, copy)["hash"] != fp


def test_the_fingerprinted_code_is_the_train_stage_code_dependency():
    from mitdet import paths, pipeline
    stage = pipeline.stages_for([B])[f"train_{B}"]
    code_deps = {d for d in stage["deps"] if d.startswith("src/mitdet/")}
    assert code_deps == {f"src/mitdet/{p}" for p in paths.TRAIN_CODE}
    assert not hasattr(ckpt, "TRAIN_CODE")  # one list: the fingerprint hashes paths.TRAIN_CODE


def test_compile_is_refused_for_cpu_training_before_any_work(run_dir, index_dir):
    from mitdet.errors import ParamsError
    model = dataclasses.replace(tiny_model(), compile=True)
    with pytest.raises(ParamsError, match="model.compile: torch.compile is not supported for training on the CPU"):
        train(B, tiny_train(), model, seed=0, index_dir=index_dir)
    assert not Path(BackbonePaths(B).checkpoints, "last.pt").exists()
