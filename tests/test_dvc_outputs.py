"""What DVC shows and keeps: small metrics, full records as cached outputs (evaluate and report come back from the
run-cache), per-class AP one `dvc metrics diff --targets` away, each backbone's model as a DVC artifact.

On a tiny copy of the pipeline (one backbone, the tiny params of tests/test_e2e_dvc.py), except the first test,
which reads the generated dvc.yaml only. The tests after it run in order on one copy.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from mitdet import pipeline
from mitdet.engine.evaluate import EVAL_KEYS, SCORE_KEYS
from tests.conftest import ROOT
from tests.test_e2e_dvc import COPY, read_strict_json, run, tiny_params

B = "mit_b0"
SMALL_METRICS = {f"metrics/{B}/scores.json", f"metrics/{B}/train_summary.json", "metrics/summary.json"}
NOT_COMPARED = ("seconds", "images_per_s", "ms_per_image", "memory", "images_seen", "num_images", "params_m")
CACHED = "is cached - skipping run, checking out outputs"  # DVC's line for a stage restored from the run-cache


def copy_repo(work: Path) -> None:
    """The files a tiny run needs, with the chart templates."""
    for rel in COPY:
        src, dst = ROOT / rel, work / rel
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)


def tool_env(work: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(work / "src")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    return env


def set_params(work: Path, **evaluate) -> None:
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["evaluate"].update(evaluate)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def commit(work: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", message], work, env)


def lock_of(work: Path, env: dict, rev: str | None = None) -> dict:
    """The evaluate and report entries of dvc.lock, at `rev` or in the workspace."""
    text = run(["git", "show", f"{rev}:dvc.lock"], work, env) if rev else (work / "dvc.lock").read_text()
    stages = yaml.safe_load(text)["stages"]
    return {name: stages[name] for name in (f"evaluate_{B}", "report")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(dvc).exists():
        pytest.skip("dvc is not installed in this interpreter's environment")
    work = tmp_path_factory.mktemp("outputs") / "project"
    work.mkdir()
    copy_repo(work)
    raw = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["backbones"] = [B]
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = tool_env(work)
    run([sys.executable, "-m", "mitdet.pipeline", "--write"], work, env)
    run(["git", "init", "-q", "-b", "main"], work, env)
    commit(work, env, "init")
    run([dvc, "repro"], work, env)
    # settles a train stage whose persisted checkpoints folder the evaluate stage wrote into (its lock file)
    run([dvc, "repro"], work, env)
    commit(work, env, "baseline")
    return work, env, dvc


def test_generated_stages_keep_metrics_small_and_the_run_cache_on():
    stages = pipeline.stages_for(["mit_b0", "mit_b3"])
    for name, stage in stages.items():
        uncached = [o for o in stage.get("outs", []) if isinstance(o, dict) and not next(iter(o.values()))
                    .get("cache", True)]
        # a plain cache: false output keeps a stage out of the run-cache; checkpoints are persist anyway
        assert all(next(iter(o.values())).get("persist") for o in uncached), (name, uncached)
    for b in ("mit_b0", "mit_b3"):
        train, evaluate = stages[f"train_{b}"], stages[f"evaluate_{b}"]
        assert train["metrics"] and train["plots"] and evaluate["metrics"]
        assert {f"models/{b}/checkpoints": {"persist": True, "cache": False}} in train["outs"]
    doc = yaml.safe_load(pipeline.render(["mit_b0", "mit_b3"]))
    assert doc["artifacts"]["mit-b3"]["path"] == "models/mit_b3" and doc["artifacts"]["mit-b3"]["type"] == "model"
    templates = {p.get("template") for c in doc["plots"] for p in c.values()}
    templates |= {p.get("template") for s in doc["stages"].values() for o in s.get("plots", []) for p in o.values()}
    for name in templates - {None, "bar_horizontal_sorted"}:
        assert (ROOT / ".dvc/plots" / f"{name}.json").is_file(), name


def test_dvc_shows_only_what_people_compare(project):
    work, env, dvc = project
    shown = json.loads(run([dvc, "metrics", "show", "--json"], work, env))
    files = {f for rev in shown.values() for f in rev["data"]}
    assert files == SMALL_METRICS, files
    scores = read_strict_json(work / f"metrics/{B}/scores.json")[B]
    assert {"AP", "AP50", "AP75", "AR100"} <= set(scores) <= set(SCORE_KEYS)
    assert set(EVAL_KEYS) <= set(read_strict_json(work / f"metrics/{B}/eval.json"))  # the full record, as before
    assert set(read_strict_json(work / f"metrics/{B}/train_summary.json")[B]) == {"steps", "final_loss",
                                                                                  "best_metric"}
    header = run([dvc, "exp", "show", "--csv"], work, env).splitlines()[0].split(",")
    metric_columns = [c for c in header if c.startswith(f"{B}.") or c.startswith("best_")]
    assert metric_columns and not [c for c in metric_columns if any(k in c for k in NOT_COMPARED)], header


def test_evaluate_and_report_come_back_from_the_run_cache(project):
    work, env, dvc = project
    assert (work / ".dvc/cache/runs").is_dir()
    before = (work / f"metrics/{B}/eval.json").read_bytes()  # with its timings: only a restore gives it back
    top_k = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]["top_k"]
    set_params(work, top_k=top_k + 1)
    out = run([dvc, "repro"], work, env)
    assert f"Running stage 'evaluate_{B}'" in out
    set_params(work, top_k=top_k)
    out = run([dvc, "repro"], work, env)
    for stage in (f"evaluate_{B}", "report"):
        assert f"Stage '{stage}' {CACHED}" in out, out[-3000:]
    assert f"Running stage 'evaluate_{B}'" not in out and "Running stage 'report'" not in out, out[-3000:]
    assert (work / f"metrics/{B}/eval.json").read_bytes() == before
    assert lock_of(work, env, "HEAD") == lock_of(work, env), "evaluate and report: not the committed run's"


def test_per_class_changes_are_one_command_away(project):
    work, env, dvc = project
    classes = set(read_strict_json(work / f"metrics/{B}/per_class.json"))
    set_params(work, max_images=3)  # half the validation images: other ground-truth counts per class
    try:
        run([dvc, "repro"], work, env)
        target = f"metrics/{B}/per_class.json"
        diff = json.loads(run([dvc, "metrics", "diff", "--targets", target, "--json"], work, env))
        changed = diff[target]
        assert changed and {key.split(".")[0] for key in changed} <= classes, changed
        assert any(key.endswith(".num_gt") for key in changed), changed
        assert target not in json.loads(run([dvc, "metrics", "diff", "--json"], work, env))
    finally:
        run(["git", "checkout", "--", "params.yaml"], work, env)
    run([dvc, "repro"], work, env)  # back to the baseline's outputs, from the run-cache
    assert lock_of(work, env, "HEAD") == lock_of(work, env)


def test_a_trained_model_is_a_dvc_artifact(project, tmp_path):
    from mitdet.models.bundle import load_inference_model

    work, env, dvc = project
    run([dvc, "remote", "add", "-d", "local", str(tmp_path / "remote")], work, env)
    commit(work, env, "a local remote")
    run([dvc, "push"], work, env)
    run(["git", "tag", "-a", "mit-b0@v1.0.0", "-m", "mit_b0 of the tiny run"], work, env)
    cache = work / ".dvc/cache"
    cache.rename(work / ".dvc/cache.off")  # the download must come from the remote
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        run([dvc, "artifacts", "get", str(work), "mit-b0", "--rev", "v1.0.0", "-o", "model"], elsewhere, env)
    finally:
        (work / ".dvc/cache.off").rename(cache)
    assert not (elsewhere / "model/checkpoints").exists()  # not DVC-tracked: not part of the artifact
    model, spec = load_inference_model(str(elsewhere / "model"))
    assert spec["backbone"] == B and sum(p.numel() for p in model.parameters()) > 0
