"""params.yaml -> typed, validated Params: the committed file loads, and bad values fail before any work."""
import copy
import dataclasses

import pytest
import yaml

from mitdet.params import BACKBONE_NAMES, ParamsError, load_params, params_from_dict
from tests.conftest import ROOT


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_with_all_backbones():
    params = load_params(ROOT / "params.yaml")
    assert params.backbones == list(BACKBONE_NAMES)
    assert params.train.lr > 0
    assert params.data.source == "synthetic"


def _with(raw, dotted, value):
    raw = copy.deepcopy(raw)
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


@pytest.mark.parametrize("dotted, value, words", [
    ("train.lr", "fast", ["`train.lr`", "'fast'", "number"]),
    ("train.lr", -0.1, ["`train.lr`", "-0.1", "out of range", "(0.0"]),
    ("train.batch_size", 0, ["`train.batch_size`", "0", "out of range", "[1"]),
    ("train.batch_size", 2.5, ["`train.batch_size`", "2.5", "integer"]),
    ("train.optimizer", "adam", ["`train.optimizer`", "'adam'", "adamw", "sgd"]),
    ("data.source", "s3", ["`data.source`", "'s3'", "synthetic", "coco2017", "local"]),
    ("model.frozen_stages", 5, ["`model.frozen_stages`", "5", "[0, 4]"]),
    ("train.augment.hflip", 1.5, ["`train.augment.hflip`", "1.5", "[0.0, 1.0]"]),
    ("model.anchor_sizes", [32, 64], ["model.anchor_sizes", "5 sizes"]),
    ("train.tensorboard", "yes", ["`train.tensorboard`", "true or false"]),
    ("backbones", ["mit_b0", "mit_b9"], ["`backbones[1]`", "'mit_b9'", "mit_b5"]),
    ("train.lr", float("nan"), ["`train.lr`", "finite"]),
])
def test_bad_values_name_key_value_and_what_is_allowed(raw, dotted, value, words):
    with pytest.raises(ParamsError) as err:
        params_from_dict(_with(raw, dotted, value))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_unknown_key_is_a_typo_error(raw):
    raw["train"]["lrr"] = 0.01
    with pytest.raises(ParamsError, match=r"unknown key `train.lrr`.*\blr\b"):
        params_from_dict(raw)


def test_unknown_top_level_group(raw):
    raw["trian"] = {}
    with pytest.raises(ParamsError, match="unknown key `trian`"):
        params_from_dict(raw)


def test_missing_required_group(raw):
    del raw["data"]
    with pytest.raises(ParamsError, match="missing key `data`"):
        params_from_dict(raw)


def test_per_backbone_overrides_apply_and_are_validated(raw):
    raw["train"]["per_backbone"] = {"mit_b5": {"batch_size": 2, "val": {"max_images": 7}}}
    params = params_from_dict(raw)
    b5 = params.train.for_backbone("mit_b5")
    assert (b5.batch_size, b5.val.max_images, b5.val.monitor) == (2, 7, params.train.val.monitor)
    assert params.train.for_backbone("mit_b0").batch_size == params.train.batch_size
    assert b5.per_backbone == {}

    raw["train"]["per_backbone"] = {"mit_b5": {"batchsize": 2}}
    with pytest.raises(ParamsError, match=r"train.per_backbone.mit_b5.batchsize"):
        params_from_dict(raw)
    raw["train"]["per_backbone"] = {"mit_b7": {"batch_size": 2}}
    with pytest.raises(ParamsError, match="unknown backbone 'mit_b7'"):
        params_from_dict(raw)


def test_yaml_scientific_notation_string_is_read_as_number(raw):
    # YAML 1.1 reads 1e-3 as a string; `dvc exp run -S train.lr=1e-3` writes exactly that
    params = params_from_dict(_with(raw, "train.lr", "1e-3"))
    assert params.train.lr == pytest.approx(1e-3)


def test_load_params_names_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_params_are_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0


def test_a_stage_with_bad_params_fails_before_any_work_with_one_line(tmp_path):
    import subprocess
    import sys

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["lrr"] = 0.01
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/prepare_data.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "`train.lrr`" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
