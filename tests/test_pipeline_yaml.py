"""dvc.yaml is generated from params.yaml: the committed file must be in sync, and stages declare what they read."""
import subprocess
import sys

import yaml

from mitdet import paths, pipeline
from mitdet.params import load_params
from tests.conftest import ROOT


def test_committed_dvc_yaml_is_in_sync_with_params():
    assert pipeline.main(["--check", "--params", str(ROOT / "params.yaml"), "--dvc-yaml", str(ROOT / "dvc.yaml")]) == 0


def test_one_train_and_evaluate_stage_per_backbone():
    stages = pipeline.stages_for(["mit_b0", "mit_b3"])
    assert list(stages) == ["prepare_data", "build_index", "train_mit_b0", "train_mit_b3",
                            "evaluate_mit_b0", "evaluate_mit_b3", "report"]
    assert stages["train_mit_b3"]["cmd"] == "python stages/train.py --backbone mit_b3"
    assert "metrics/mit_b3/eval.json" in stages["report"]["deps"]
    assert "metrics/mit_b5/eval.json" not in stages["report"]["deps"]


def test_stage_params_keep_train_changes_away_from_data_stages():
    stages = pipeline.stages_for(load_params(ROOT / "params.yaml").backbones)
    for name in ("prepare_data", "build_index"):
        assert not any(p.split(".")[0] in ("train", "model", "evaluate") for p in stages[name]["params"])
    train_params = stages["train_mit_b0"]["params"]
    assert "train.lr" in train_params and "train.per_backbone.mit_b0" in train_params
    assert "train.per_backbone.mit_b1" not in train_params and "train.per_backbone" not in train_params
    assert "model.roi.score_thresh" not in train_params and "model.roi.score_thresh" in stages["evaluate_mit_b0"]["params"]


def test_every_code_dep_exists_in_the_repo():
    doc = yaml.safe_load(pipeline.render(["mit_b0"]))
    for name, stage in doc["stages"].items():
        for dep in stage["deps"]:
            if dep.startswith(("stages/", "src/")):
                assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_train_code_lists_every_module_training_imports():
    """The fingerprint and the train stages' code deps hash paths.TRAIN_CODE: a module the trainer imports but
    the list misses would change training without rerunning it."""
    code = "import sys, mitdet.engine.train; print(' '.join(m for m in sys.modules if m.startswith('mitdet.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = {m for m in done.stdout.split() if (ROOT / "src" / (m.replace(".", "/") + ".py")).is_file()}
    files = {m.removeprefix("mitdet.").replace(".", "/") + ".py" for m in modules}
    assert files - set(paths.TRAIN_CODE) <= {"paths.py"}  # file names only: moving an output retrains nothing


def test_prepare_data_depends_on_the_folders_the_source_sets(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["data"]["source"] = "yolo"
    doc["data"]["yolo"]["tests"] = {"night": {"images": "n/images", "labels": "n/labels", "aux": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    deps = pipeline.stages_for(["mit_b0"], load_params(tmp_path / "params.yaml").data)["prepare_data"]["deps"]
    assert {"${data.yolo.train.images}", "${data.yolo.train.labels}", "${data.yolo.tests.night.images}",
            "${data.yolo.tests.night.labels}"} <= set(deps)
    assert not any(d.startswith("${data.yolo.val") or d.endswith(".aux}") for d in deps)  # null: nothing to track
    assert set(pipeline.LOCAL_DATA) <= set(deps)  # data/example stays tracked whatever the source
    doc["data"]["source"] = "local"
    doc["data"]["local"]["val"]["aux"] = "data/example/val_aux"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    deps = pipeline.stages_for(["mit_b0"], load_params(tmp_path / "params.yaml").data)["prepare_data"]["deps"]
    assert "${data.local.val.aux}" in deps and not any(d.startswith("${data.yolo") for d in deps)
    assert pipeline.main(["--check", "--params", str(tmp_path / "params.yaml"), "--dvc-yaml",
                          str(ROOT / "dvc.yaml")]) == 1  # dvc.yaml must be regenerated after such a change
