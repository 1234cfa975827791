"""End to end: the whole DVC pipeline on a copy of the repo, with tiny params and two backbones.

Runs the real stage scripts through `dvc repro`, then the experiment workflow a user runs: `dvc exp run -S
train.lr=0.01` must rerun only the stages that depend on `train`, `dvc metrics diff` must list what changed,
`dvc plots show` must write its HTML.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BACKBONES = ["mit_b0", "mit_b1"]
COPY = ["dvc.yaml", "params.yaml", "stages", "src", "data/example", ".dvc/config", ".dvc/plots", ".dvcignore",
        ".gitignore", "metrics/.gitkeep", "plots/.gitkeep"]


def tiny_params(raw: dict) -> dict:
    raw["backbones"] = BACKBONES
    raw["data"]["synthetic"].update(train_images=12, val_images=6, min_side=64, max_side=96)
    raw["model"].update(fpn_channels=16, min_size=64, max_size=96, anchor_sizes=[8, 16, 32, 64, 128])
    raw["model"]["rpn"].update(pre_nms_top_n_train=64, post_nms_top_n_train=32, pre_nms_top_n_test=32,
                               post_nms_top_n_test=16, batch_size_per_image=32)
    raw["model"]["roi"].update(batch_size_per_image=16, detections_per_img=20)
    raw["train"].update(epochs=1, max_steps=3, batch_size=2, warmup_steps=1, num_workers=0, log_every_steps=1,
                        per_backbone={b: {} for b in BACKBONES})
    raw["train"]["quick_eval"]["interval"] = 2
    raw["train"]["quick_eval"]["samples"] = 2
    raw["train"]["val"].update(interval=1, unit="epochs", max_images=4)
    raw["train"]["checkpoint"]["every_steps"] = 2
    raw["evaluate"].update(batch_size=2, samples=2, speed_images=2, speed_warmup=1)
    return raw


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def make_project(work: Path) -> tuple[Path, dict, str]:
    """A git repository at `work` holding a copy of the pipeline with tiny params: (work, env, dvc)."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(dvc).exists():
        pytest.skip("dvc is not installed in this interpreter's environment")
    work.mkdir()
    for rel in COPY:
        src = ROOT / rel
        if not src.exists():
            continue
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    raw = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(work / "src")  # the copy's code, not the checkout's
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    run([sys.executable, "-m", "mitdet.pipeline", "--write"], work, env)
    run(["git", "init", "-q", "-b", "main"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "init"], work, env)
    return work, env, dvc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work, env, dvc = make_project(tmp_path_factory.mktemp("e2e") / "project")
    repro = run([dvc, "repro"], work, env)
    return work, env, dvc, repro


def read_strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def experiment_and_baseline(show: list[dict]) -> tuple[dict, dict]:
    """`dvc exp show --json` -> (the baseline commit's data, its one experiment's data)."""
    baselines = [e for e in show if e["rev"] != "workspace"]
    assert len(baselines) == 1, show
    runs = [r for group in baselines[0]["experiments"] or [] for r in group["revs"]]
    assert len(runs) == 1, baselines[0]["experiments"]
    assert baselines[0]["error"] is None and runs[0]["error"] is None, (baselines[0]["error"], runs[0]["error"])
    return baselines[0]["data"], runs[0]["data"]


def params_of(data: dict) -> dict:
    return data["params"]["params.yaml"]["data"]


def train_metrics_of(data: dict, backbone: str) -> dict:
    return data["metrics"][f"metrics/{backbone}/train_summary.json"]["data"][backbone]


def test_repro_runs_every_stage_and_writes_outputs(project):
    work, _, _, repro = project
    for stage in ["prepare_data", "build_index", *[f"{k}_{b}" for k in ("train", "evaluate") for b in BACKBONES],
                  "report"]:
        assert f"Running stage '{stage}'" in repro, stage
    assert (work / "data/index/rejected.csv").is_file()
    assert read_strict_json(work / "metrics/index.json")
    for b in BACKBONES:
        assert (work / f"models/{b}/model.safetensors").stat().st_size > 0
        assert read_strict_json(work / f"models/{b}/model.json")["backbone"] == b
        assert (work / f"models/{b}/checkpoints/last.pt").is_file()
        assert read_strict_json(work / f"metrics/{b}/train.json")
        ev = read_strict_json(work / f"metrics/{b}/eval.json")
        assert {"AP", "AP50", "images_per_s", "params_m", "gflops", "num_images"} <= set(ev)
        assert ev["num_images"] == 6
        assert isinstance(read_strict_json(work / f"data/predictions/{b}.json"), list)
        assert "loss_classifier" in (work / f"plots/{b}/train_batches.csv").read_text().splitlines()[0]
    report = read_strict_json(work / "metrics/report.json")
    assert all(report["backbones"][b]["status"] == "ok" for b in BACKBONES)
    assert report["best_backbone"] in BACKBONES and set(report["pareto"]) <= set(BACKBONES)
    assert all(report["backbones"][b]["status"] == "missing" for b in ("mit_b2", "mit_b5"))  # not in backbones:
    table = (work / "metrics/report.md").read_text()
    assert all(f"| {b} |" in table or f"**{b}**" in table for b in BACKBONES)


def test_second_repro_is_a_noop(project):
    work, env, dvc, _ = project
    out = run([dvc, "repro"], work, env)
    assert "Running stage" not in out


def test_make_repro_trains_side_by_side_to_the_same_weights(project, tmp_path):
    """`python -m mitdet.repro` (what `make repro` runs): the two train stages run at once, each in its own
    `dvc repro`, and give bitwise the weights the one-at-a-time `dvc repro` gave; the project ends up to date."""
    work, env, dvc, _ = project
    other, other_env, _ = make_project(tmp_path / "lanes")
    out = run([sys.executable, "-m", "mitdet.repro", "--lanes", "2", "--dvc", dvc], other, other_env)
    assert "training train_mit_b0, train_mit_b1: 2 at a time" in out
    lines = out.splitlines()
    starts = [lines.index(f"train_mit_b{k} | Running stage 'train_mit_b{k}':") for k in (0, 1)]
    ends = [max(i for i, line in enumerate(lines) if line.startswith(f"train_mit_b{k} | ")) for k in (0, 1)]
    assert max(starts) < min(ends), "each train stage started before the other one finished"
    for stage in ("prepare_data", "build_index", "evaluate_mit_b0", "evaluate_mit_b1", "report"):
        assert f"Running stage '{stage}'" in out
    assert json.loads(run([dvc, "status", "--json"], other, other_env)) == {}
    for b in BACKBONES:
        weights = f"models/{b}/model.safetensors"
        assert (other / weights).read_bytes() == (work / weights).read_bytes(), b
    again = run([sys.executable, "-m", "mitdet.repro", "--lanes", "2", "--dvc", dvc], other, other_env)
    assert "Running stage" not in again and "at a time" not in again


def changed_stages(work: Path, env: dict, dvc: str) -> set[str]:
    """The stages `dvc status` reports as changed (what `dvc repro` would run first)."""
    return set(json.loads(run([dvc, "status", "--json"], work, env)))


def set_param(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return raw


@pytest.mark.parametrize("change,expected", [
    # one backbone's override reruns that backbone only
    ({"train.per_backbone.mit_b1": {"batch_size": 1}}, {"train_mit_b1"}),
    # inference-only settings rerun evaluation only
    ({"model.roi.score_thresh": 0.2, "model.rpn.post_nms_top_n_test": 8}, {"evaluate_mit_b0", "evaluate_mit_b1"}),
    ({"evaluate.weights": "last"}, {"evaluate_mit_b0", "evaluate_mit_b1"}),
    # logging, workers, quick evals, TensorBoard and checkpoint cadence shape no weights
    ({"train.log_every_steps": 5, "train.num_workers": 1, "train.tensorboard": True,
      "train.quick_eval.interval": 7, "train.checkpoint.every_steps": 9}, set()),
    # what shapes training reruns every backbone
    ({"train.lr": 0.002}, {"train_mit_b0", "train_mit_b1"}),
])
def test_a_param_change_reruns_only_what_it_reads(project, change, expected):
    work, env, dvc, _ = project
    original = (work / "params.yaml").read_text()
    raw = yaml.safe_load(original)
    for key, value in change.items():
        set_param(raw, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert changed_stages(work, env, dvc) == expected
    finally:
        (work / "params.yaml").write_text(original)
    assert changed_stages(work, env, dvc) == set()


@pytest.mark.parametrize("path,retrains", [("src/mitdet/drawing.py", False), ("src/mitdet/paths.py", False),
                                           ("src/mitdet/data/build_index.py", False),  # its output is the dep
                                           ("src/mitdet/engine/optim.py", True)])
def test_a_code_change_retrains_only_when_training_runs_it(project, path, retrains):
    work, env, dvc, _ = project
    original = (work / path).read_text()
    (work / path).write_text(original + "\n# an edit\n")
    try:
        changed = changed_stages(work, env, dvc)
    finally:
        (work / path).write_text(original)
    assert bool(changed & {"train_mit_b0", "train_mit_b1"}) == retrains, changed
    assert changed, "every code file is some stage's dependency"


def test_exp_run_with_new_lr_reruns_only_train_dependents(project):
    work, env, dvc, _ = project
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    out = run([dvc, "exp", "run", "-S", "train.lr=0.01"], work, env)
    for stage in ("prepare_data", "build_index"):
        assert f"Running stage '{stage}'" not in out, out[-3000:]
    for b in BACKBONES:
        for kind in ("train", "evaluate"):
            assert f"Running stage '{kind}_{b}'" in out
    assert "Running stage 'report'" in out
    assert yaml.safe_load((work / "params.yaml").read_text())["train"]["lr"] == 0.01

    diff = run([dvc, "metrics", "diff", "--json"], work, env)
    changed = json.loads(diff)
    assert any(path.startswith("metrics/mit_b0/") for path in changed), changed

    # the experiment, as DVC recorded it: its params say lr 0.01 (the baseline's do not), and each backbone's
    # training metrics differ from the baseline's (final_loss: the same data and steps, another learning rate)
    baseline, exp = experiment_and_baseline(json.loads(run([dvc, "exp", "show", "--json"], work, env)))
    assert params_of(exp)["train"]["lr"] == 0.01
    assert params_of(baseline)["train"]["lr"] == yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["lr"]
    assert params_of(baseline)["train"]["lr"] != 0.01
    for b in BACKBONES:
        old, new = train_metrics_of(baseline, b), train_metrics_of(exp, b)
        assert old["steps"] == new["steps"] > 0, (old, new)
        assert isinstance(new["final_loss"], float) and new["final_loss"] != old["final_loss"], (b, old, new)


def test_plots_show_writes_html(project):
    work, env, dvc, _ = project
    run([dvc, "plots", "show", "-o", "plots_html"], work, env)
    html = (work / "plots_html" / "index.html").read_text()
    assert "Training loss, all backbones" in html  # the top-level cross-backbone chart
    for b in BACKBONES:
        assert f"{b}: training loss" in html and f"{b}: AP per class" in html
