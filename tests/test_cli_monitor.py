"""`mitdet monitor`: a run's view from the train stage's files, its alerts, and the summary once it finishes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mitdet.engine import watch
from tests.cli_fixtures import run_cli

B = "mit_b0"
HEADER = "epoch,step,loss,loss_classifier,loss_box_reg,loss_objectness,loss_rpn_box_reg,lr,images_per_s,timestamp\n"


def batch_row(step: int, loss: float | None, t0: int = 1_790_000_000) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + step))  # one step per second
    cell = "" if loss is None else f"{loss:.6g}"
    return f"{1 + step // 50},{step},{cell},0.3,0.2,0.1,0.05,0.001,12.5,{stamp}\n"


def write_finished_run(root, total: int = 100) -> None:
    """The files of a finished run, with a loss spike, a window of non-finite steps and worsening validation."""
    plots, metrics, models = root / "plots" / B, root / "metrics" / B, root / "models" / B
    for d in (plots, metrics, models):
        d.mkdir(parents=True, exist_ok=True)
    losses = {10: 2.0, 20: 1.5, 30: 1.2, 40: 9.0, 50: None, 60: 1.0, 70: 0.9, 80: 0.85, 90: 0.8, 100: 0.75}
    (plots / "train_batches.csv").write_text(HEADER + "".join(batch_row(s, v) for s, v in losses.items()))
    val = [(20, 0.30), (40, 0.28), (60, 0.25), (80, 0.21), (100, 0.35)]
    (plots / "val_history.csv").write_text("step,epoch,AP,AP50,AP75\n" + "".join(
        f"{s},{1 + s // 50},{v / 2:.4f},{v:.4f},{v / 3:.4f}\n" for s, v in val))
    (metrics / "train.json").write_text(json.dumps({
        "backbone": B, "epochs": 2.0, "steps": total, "total_steps": total, "best_step": 100, "best_epoch": 2,
        "best_metric": 0.35, "monitor": "AP50", "weights_from": "best", "early_stopped": False,
        "final_loss": 0.75, "seconds": 100.0, "images_per_s": 12.5}))
    (metrics / "per_class.json").write_text(json.dumps({
        "cat": {"AP": 0.5}, "dog": {"AP": 0.2}, "bird": {"AP": 0.35}, "fish": {"AP": None}}))
    (models / "model.safetensors").write_bytes(b"weights")


def test_a_finished_run_prints_its_summary_and_alerts(tmp_path, capsys):
    write_finished_run(tmp_path)
    code, out, _ = run_cli(["monitor", B, "--root", str(tmp_path)], capsys)
    assert code == 0  # finished: no waiting
    assert "mit_b0 finished: 100 steps, 2 epochs in 0:01:40 (12.5 images/s); final loss 0.7500" in out
    assert "best AP50 0.3500 at step 100 (epoch 2); weights from best" in out
    assert "alerts during the run: 3" in out
    assert "step 40: loss spike 9, more than 3x its moving average" in out
    assert "step 50: non-finite loss" in out
    assert "step 80: validation AP50 got worse 3 times in a row (now 0.2100)" in out
    assert ("classes by AP (this run's evaluation): best cat 50.0, bird 35.0, dog 20.0; worst dog 20.0, bird 35.0, "
            "cat 50.0") in out


def test_a_per_class_file_older_than_the_run_is_said_to_be(tmp_path, capsys):
    write_finished_run(tmp_path)
    per_class = tmp_path / "metrics" / B / "per_class.json"
    os.utime(per_class, (time.time() - 3600, time.time() - 3600))  # evaluated before this run was trained
    out = run_cli(["monitor", B, "--once", "--root", str(tmp_path)], capsys)[1]
    assert "classes by AP (an evaluation before this run): best cat 50.0" in out


def test_once_on_a_running_run_shows_progress_eta_and_validation(tmp_path, capsys):
    write_finished_run(tmp_path)
    tj = tmp_path / "metrics" / B / "train.json"
    tj.write_text(json.dumps({"total_steps": 200, "steps": 100, "finished": False}))  # a trainer's running fields
    code, out, _ = run_cli(["monitor", "--once", "--root", str(tmp_path)], capsys)  # backbone: the latest log
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("mitdet monitor: mit_b0 (plots/mit_b0/train_batches.csv, updated")
    assert lines[1] == "step 100/200 (50.0%)  epoch 3  ETA 0:01:40"  # 100 steps left at 1 step/s
    assert lines[2].startswith("loss 0.7500  avg ") and "classifier 0.3000" in lines[2] and "rpn_box_reg" in lines[2]
    assert lines[3] == "lr 0.001   12.5 images/s"
    assert lines[4] == "validation (step 100): AP 0.1750  AP50 0.3500  AP75 0.1167"
    assert sum(ln.startswith("ALERT ") for ln in lines) == 3


def test_a_half_written_last_row_is_left_for_the_next_read(tmp_path):
    write_finished_run(tmp_path)
    log = tmp_path / "plots" / B / "train_batches.csv"
    log.write_text(log.read_text() + "3,110,0.7")
    assert watch.read_rows(log)[-1]["step"] == 100


@pytest.mark.parametrize("train_json, weights, finished", [
    ({"steps": 50, "total_steps": 100, "finished": False}, True, False),
    ({"steps": 100, "total_steps": 100, "finished": True}, True, True),
    ({"steps": 100, "total_steps": 100}, True, True),     # a trainer writing train.json only at the end
    ({"steps": 100, "total_steps": 100}, False, False),   # ... but its weights are not written yet
    ({"steps": 60, "total_steps": 100, "early_stopped": True}, True, True),
    (None, True, False),
])
def test_when_a_run_counts_as_finished(train_json, weights, finished):
    run = watch.RunFiles(B, [], [], train_json, None, weights, None)
    assert watch.is_finished(run) is finished


WRITER = textwrap.dedent("""
    # a stand-in trainer: appends a log row every 0.2 s, then writes its weights and a finished train.json
    import json, sys, time
    from pathlib import Path
    root, header = Path(sys.argv[1]), sys.argv[2]
    log = root / "plots/mit_b0/train_batches.csv"
    for d in ("plots", "metrics", "models"):
        (root / d / "mit_b0").mkdir(parents=True)
    (root / "metrics/mit_b0/train.json").write_text(json.dumps({"total_steps": 80, "steps": 0, "finished": False}))
    log.write_text(header)
    for step in range(10, 90, 10):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(log, "a") as f:
            f.write(f"1,{step},{2.0 - step / 100},0.3,0.2,0.1,0.05,0.001,10.0,{stamp}\\n")
        time.sleep(0.2)
    (root / "models/mit_b0/model.safetensors").write_bytes(b"w")
    (root / "metrics/mit_b0/train.json").write_text(json.dumps({"total_steps": 80, "steps": 80, "finished": True,
        "epochs": 1.0, "seconds": 1.6, "final_loss": 1.2, "images_per_s": 10.0}))
""")


def test_following_a_run_being_written_until_it_finishes(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), HEADER])
    try:
        out = io.StringIO()
        start = time.monotonic()
        code = watch.watch(tmp_path, B, interval=0.1, timeout=60, out=out, tty=False)
        seconds = time.monotonic() - start
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0 and code == 0 and seconds < 30
    lines = out.getvalue().splitlines()
    steps = [int(ln.split()[2].split("/")[0]) for ln in lines if ln.startswith("mit_b0 step ")]
    assert len(steps) >= 3 and steps == sorted(steps) and len(set(steps)) == len(steps)  # one line per new step
    assert all("/80 (" in ln for ln in lines if ln.startswith("mit_b0 step "))
    assert "mit_b0 finished: 80 steps, 1 epochs" in out.getvalue()


def test_a_terminal_gets_a_redrawn_frame_and_a_timeout_exits_1(tmp_path):
    write_finished_run(tmp_path)
    (tmp_path / "metrics" / B / "train.json").write_text(json.dumps({"total_steps": 200, "steps": 100}))
    out = io.StringIO()
    assert watch.watch(tmp_path, B, interval=0.05, timeout=0.2, out=out, tty=True) == 1
    text = out.getvalue()
    assert text.count(watch.CLEAR) >= 2 and "step 100/200 (50.0%)" in text
    assert text.rstrip().endswith("the run did not finish within 0.2 s")


def test_no_run_yet(tmp_path, capsys):
    code, _, err = run_cli(["monitor", "--root", str(tmp_path)], capsys)
    assert code == 1 and err.startswith("error: ") and "no training run found" in err
    code, out, _ = run_cli(["monitor", B, "--once", "--root", str(tmp_path)], capsys)
    assert code == 0 and "waiting for plots/mit_b0/train_batches.csv" in out


def test_eta_from_train_json_before_two_rows_are_logged():
    one_row = [{"step": 10.0, "timestamp": "2026-01-01T00:00:00Z"}]
    run = watch.RunFiles(B, one_row, [], {"total_steps": 200, "steps": 10, "seconds": 50.0}, None, False, None)
    assert watch.eta_seconds(run) == pytest.approx(950.0)  # 190 steps at 0.2 steps/s
    assert watch.eta_seconds(watch.RunFiles(B, one_row, [], {"steps": 10}, None, False, None)) is None
