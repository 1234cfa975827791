"""Faults survived: kill -9 at named points of the checkpoint and model writes, an unreadable last.pt, a lost
best.pt, a parent `dvc` that goes away, a second evaluation beside a running one."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mitdet.engine import checkpoint as ckpt
from mitdet.engine.stopping import locked
from mitdet.engine.train import train
from mitdet.errors import TrainingError
from mitdet.paths import BackbonePaths
from tests.test_train import B, REPO, outputs, same_weights, write_params
from tests.train_fixtures import tiny_model, tiny_train, write_index

P = BackbonePaths(B)
# 8 images, batch 2: 4 steps an epoch, 3 epochs; validation every epoch (best.pt), last.pt every 3 steps
RUN = dict(epochs=3, val={"interval": 1, "max_images": 2}, checkpoint={"every_steps": 3, "keep": 2})

# Kill this process (SIGKILL: no handler, no cleanup) when the N-th rename onto a file named NAME is about to
# happen: the temp file is complete, the target not yet replaced, as in a kill during that write.
KILLER = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {src!r}]
import mitdet.io
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == {name!r}:
        seen[0] += 1
        if seen[0] == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
mitdet.io.os.replace = replace
from tests.train_fixtures import tiny_model, tiny_train
from mitdet.engine.train import train
train({b!r}, tiny_train(**{kw!r}), tiny_model(), seed=0, index_dir={index!r})
"""


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> str:
    return str(write_index(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4, size=64))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, index_dir) -> dict:
    root = tmp_path_factory.mktemp("straight")
    return train_in(root, index_dir)


def train_in(root: Path, index_dir: str, **kw) -> dict:
    cwd = os.getcwd()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    try:
        train(B, tiny_train(**RUN), tiny_model(), seed=0, index_dir=index_dir, **kw)
        return outputs(Path("."))
    finally:
        os.chdir(cwd)


def assert_same_run(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    assert same_weights(a.pop("weights"), b.pop("weights"))
    assert a == b


@pytest.mark.parametrize("name,nth", [("last.pt", 2), ("best.pt", 1), ("epoch_001.pt", 1), ("last.pt", 5),
                                      ("model.safetensors", 1), ("train.json", 3)])
def test_kill_9_during_a_write_then_resume_gives_the_same_model(tmp_path, index_dir, straight, name, nth):
    code = KILLER.format(repo=str(REPO), src=str(REPO / "src"), name=name, nth=nth, b=B, kw=RUN, index=index_dir)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert_same_run(train_in(tmp_path, index_dir), straight)


def test_an_unreadable_last_pt_resumes_from_the_newest_epoch_checkpoint(tmp_path, index_dir, straight):
    from mitdet.engine.train import Hooks, Interrupted
    with pytest.raises(Interrupted):
        train_in(tmp_path, index_dir, hooks=Hooks(should_stop=lambda s: s == 6))
    ck = tmp_path / P.checkpoints
    assert (ck / "epoch_001.pt").is_file() and (ck / "best.pt").is_file()
    (ck / "last.pt").write_bytes(b"\x00garbage, as after a bad disk")
    resumed = train_in(tmp_path, index_dir)
    assert_same_run(resumed, straight)
    assert list(ck.glob("last.pt.stale-*"))  # the unreadable file is kept aside, not deleted


def test_a_lost_best_pt_beside_a_finished_run_is_recovered(tmp_path, index_dir, straight):
    train_in(tmp_path, index_dir)
    (tmp_path / P.checkpoints / "best.pt").unlink()
    for path in (P.weights, P.model_json):
        (tmp_path / path).unlink()
    assert_same_run(train_in(tmp_path, index_dir), straight)  # from the stored finished run
    for stored in (tmp_path / P.checkpoints / ckpt.FINISHED_DIR).glob("*.pt"):
        stored.unlink()
    (tmp_path / P.checkpoints / "best.pt").unlink(missing_ok=True)
    assert_same_run(train_in(tmp_path, index_dir), straight)  # none stored: trained again, the same


def test_the_stage_stops_cleanly_when_its_parent_dvc_is_gone(tmp_path):
    write_index(tmp_path, n_train=8, n_val=2, size=64)
    write_params(tmp_path, max_steps=400)
    parent = ("import subprocess, sys, os\n"
              f"p = subprocess.Popen([sys.executable, {str(REPO / 'stages' / 'train.py')!r}, '--backbone', {B!r}],"
              " stderr=open('stage.err', 'w'))\n"
              "print(p.pid, flush=True)\n"
              "import time; time.sleep(float(sys.argv[1]))\n"
              "os._exit(0)  # as a dvc killed by SIGTERM: the stage is left behind\n")
    env = {**os.environ, "DVC_STAGE": f"train_{B}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", parent, "12"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the orphaned stage kept running")
    err = (tmp_path / "stage.err").read_text()
    assert "parent process" in err and "interrupted at step" in err, err[-2000:]
    state = ckpt.load(tmp_path / P.checkpoints / "last.pt")
    assert 0 < state["step"] < 400 and not state["finished"]


def test_a_second_evaluation_of_a_backbone_fails_at_once(tmp_path):
    folder = tmp_path / P.checkpoints
    folder.mkdir(parents=True)
    with open(folder / ".evaluate.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match=r"another evaluation is running on this folder"):
            with locked(folder, name=".evaluate.lock", who="evaluation"):
                pass


def test_params_yaml_edited_while_a_stage_runs_fails_the_stage(tmp_path, monkeypatch, capsys):
    from mitdet import stage
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())

    def main() -> int:
        stage.load_params("params.yaml")
        text = (tmp_path / "params.yaml").read_text()
        (tmp_path / "params.yaml").write_text(text.replace("lr: 0.001", "lr: 0.002"))  # an edit mid-run
        return 0
    with pytest.raises(SystemExit) as stop:
        stage.run(main)
    assert stop.value.code == 2  # so DVC does not record the edited params in dvc.lock
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: params.yaml: changed while this stage ran: its outputs follow the params read at its "
                   "start; run the stage again (`dvc repro`)"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error(tiny_disk):
    import torch
    from mitdet.errors import CheckpointError
    path = tiny_disk / "last.pt"
    ckpt.save(path, {"step": 1, "w": torch.zeros(10)})
    with pytest.raises(CheckpointError, match=r"last.pt: no space left on the device .*the file written before"):
        ckpt.save(path, {"step": 2, "w": torch.zeros(1_000_000)})
    assert ckpt.load(path)["step"] == 1  # the earlier checkpoint is intact
    assert [p.name for p in tiny_disk.iterdir()] == ["last.pt"]  # no temp file left behind


def test_a_full_disk_in_any_stage_write_is_one_line(tiny_disk, capsys):
    from mitdet import stage
    from mitdet.io import write_bytes

    def main() -> int:
        write_bytes(tiny_disk / "big.bin", b"\0" * 2_000_000)
        return 0
    with pytest.raises(SystemExit) as stop:
        stage.run(main)
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "no space left on the device" in line
