"""dvc.yaml is generated from params.yaml: the committed file must be in sync, and stages declare what they read."""
import yaml

from mitdet import pipeline
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
