"""`make repro`'s side-by-side training (mitdet.repro): how many train stages fit the cores, and the order of the
DVC commands it runs, with a stand-in `dvc` that records its calls (test_e2e_dvc runs the real one)."""
from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import yaml

from mitdet import repro
from mitdet.params import load_params
from tests.conftest import ROOT


def params_with(tmp_path: Path, **train) -> object:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    per_backbone = train.pop("per_backbone", {})
    raw["train"].update(train)
    for b, override in per_backbone.items():
        raw["train"]["per_backbone"][b] = {**raw["train"]["per_backbone"][b], **override}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


@pytest.mark.parametrize("train,cores,lanes", [
    ({"threads": 1, "num_workers": 0}, 2, 2),  # the defaults on this project's 2-core machines
    ({"threads": 1, "num_workers": 0}, 1, 1),
    ({"threads": 1, "num_workers": 0}, 64, 6),  # never more than there are backbones
    ({"threads": 1, "num_workers": 1}, 2, 1),  # a loader worker takes a core too
    ({"threads": 2, "num_workers": 1}, 16, 5),
    ({"threads": 0, "num_workers": 0}, 16, 1),  # 0 threads: every core, one stage at a time
    ({"threads": 1, "num_workers": 0, "nproc_per_node": 2}, 4, 2),  # DDP: per process
    ({"threads": 1, "num_workers": 0, "per_backbone": {"mit_b5": {"threads": 4}}}, 8, 2),  # the widest decides
])
def test_train_lanes_fit_the_cores(tmp_path, train, cores, lanes):
    assert repro.train_lanes(params_with(tmp_path, **train), cores, accelerator=False) == lanes


def test_one_train_stage_at_a_time_on_an_accelerator(tmp_path):
    params = params_with(tmp_path, threads=1, num_workers=0)
    assert repro.train_lanes(params, 16, accelerator=True) == 1
    assert repro.uses_accelerator(params_with(tmp_path, device="cuda")) is True
    assert repro.uses_accelerator(params_with(tmp_path, device="cpu")) is False


def test_stale_train_stages_in_backbone_order():
    status = {"evaluate_mit_b0": [], "train_mit_b3": [{"changed deps": {}}], "train_mit_b1": []}
    assert repro.stale_train_stages(status, ["mit_b0", "mit_b1", "mit_b3"]) == ["train_mit_b1", "train_mit_b3"]
    assert repro.stale_train_stages({}, ["mit_b0"]) == []


def test_side_by_side_runs_at_once_and_prefixes_each_line(tmp_path, capsys):
    """Each command waits for the other's file: they finish only if they ran at the same time."""
    wait = ("import pathlib, sys, time\n"
            "me, other = sys.argv[1:]\n"
            "pathlib.Path(me).touch(); print('started', flush=True)\n"
            "deadline = time.time() + 60\n"
            "while not pathlib.Path(other).exists() and time.time() < deadline: time.sleep(0.01)\n"
            "print('saw the other' if pathlib.Path(other).exists() else 'alone'); sys.exit(3 if me.endswith('b') else 0)\n")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    codes = repro.run_side_by_side({"one": [sys.executable, "-c", wait, a, b],
                                    "two": [sys.executable, "-c", wait, b, a]}, lanes=2)
    assert codes == {"one": 0, "two": 3}
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == ["one | saw the other", "one | started", "two | saw the other", "two | started"]


def test_one_lane_runs_in_order(capsys):
    codes = repro.run_side_by_side({"x": [sys.executable, "-c", "print(1); print(2)"],
                                    "yy": [sys.executable, "-c", "print(3)"]}, lanes=1)
    assert codes == {"x": 0, "yy": 0}
    assert capsys.readouterr().out.splitlines() == ["x  | 1", "x  | 2", "yy | 3"]


def fake_dvc(tmp_path: Path, status: dict, fail: str = "") -> tuple[str, Path]:
    """An executable that appends its arguments to calls.txt, prints `status` for `status --json` and fails
    (exit 4) when its last argument is `fail`."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "dvc"
    script.write_text(f"#!{sys.executable}\n"
                      "import json, sys\n"
                      f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                      f"if sys.argv[1:] == ['status', '--json']: print(json.dumps({status!r}))\n"
                      f"sys.exit(4 if {fail!r} and sys.argv[-1] == {fail!r} else 0)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def test_repro_runs_data_then_stale_trains_then_the_rest(tmp_path, capsys):
    params = params_with(tmp_path, threads=1, num_workers=0)
    dvc, calls = fake_dvc(tmp_path, {"build_index": [], "train_mit_b2": [], "train_mit_b0": [], "evaluate_mit_b0": []})
    assert repro.repro(params, lanes=2, dvc=dvc) == 0
    lines = calls.read_text().splitlines()
    assert lines[:3] == ["status --json", "repro build_index", "status --json"] and lines[-1] == "repro"
    assert sorted(lines[3:-1]) == ["--wait-for-lock repro --single-item train_mit_b0",
                                   "--wait-for-lock repro --single-item train_mit_b2"]
    assert "training train_mit_b0, train_mit_b2: 2 at a time" in capsys.readouterr().out


def test_repro_with_one_lane_or_one_stale_stage_is_plain_dvc_repro(tmp_path):
    params = params_with(tmp_path, threads=1, num_workers=0)
    for lanes, status in ((1, {"train_mit_b0": [], "train_mit_b1": []}), (2, {"train_mit_b1": []})):
        dvc, calls = fake_dvc(tmp_path, status)
        calls.unlink(missing_ok=True)
        assert repro.repro(params, lanes=lanes, dvc=dvc) == 0
        assert calls.read_text().splitlines() == ["status --json", "repro"]  # the data stages were up to date


def test_a_failed_train_stage_stops_before_the_rest(tmp_path, capsys):
    params = params_with(tmp_path, threads=1, num_workers=0)
    dvc, calls = fake_dvc(tmp_path, {"train_mit_b0": [], "train_mit_b1": []}, fail="train_mit_b1")
    assert repro.repro(params, lanes=2, dvc=dvc) == 4
    lines = calls.read_text().splitlines()
    assert "repro" not in lines and len(lines) == 3  # the other stage still ran to its end; nothing after
    assert "error: train_mit_b1 failed" in capsys.readouterr().err


def test_bad_lanes_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        repro.main(["--lanes", "0"])
    assert exc.value.code == 2 and "--lanes must be at least 1" in capsys.readouterr().err



def test_a_failed_status_leaves_the_error_to_dvc_repro(tmp_path, capfd):
    params = params_with(tmp_path, threads=1, num_workers=0)
    script = tmp_path / "dvc"
    script.write_text(f"#!{sys.executable}\nimport sys\nprint('ERROR: failed to read dvc.yaml', file=sys.stderr)\n"
                      "sys.exit(255)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    assert repro.repro(params, lanes=2, dvc=str(script)) == 255  # DVC's own code and message, once
    assert capfd.readouterr().err.count("failed to read dvc.yaml") == 1
