"""params.yaml -> typed, validated Params: the committed file loads, and bad values fail before any work."""
import copy
import dataclasses

import pytest
import yaml

from mitdet.errors import MitdetError
from mitdet.params import (BACKBONE_NAMES, MAX_BATCH_SIZE, MAX_SEED, ModelParams, Params, ParamsError, TrainParams,
                           load_params, model_params_from_dict, params_from_dict, to_dict)
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


def _leaves(node, prefix=""):
    """Dotted keys of every leaf of a params dict; `train.per_backbone` counts as one leaf (its overrides are optional)."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "train.per_backbone":
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted


def _without(raw, dotted):
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    return raw


_COMMITTED_LEAVES = list(_leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))


@pytest.mark.parametrize("dotted", _COMMITTED_LEAVES)
def test_every_key_of_params_yaml_is_required(raw, dotted):
    # a deleted key must not silently take the dataclass default (another model would train)
    with pytest.raises(ParamsError, match=rf"missing key `{dotted}`; add it to params.yaml") as err:
        params_from_dict(_without(raw, dotted), source="params.yaml")
    assert str(err.value).startswith("params.yaml: ")


def test_leaf_walk_covers_the_whole_file():
    assert len(_COMMITTED_LEAVES) > 100
    assert {"seed", "model.fpn_channels", "model.rpn.nms_thresh", "data.local.val.annotations",
            "train.per_backbone", "report.heatmap_max_classes"} <= set(_COMMITTED_LEAVES)
    assert not any(k.startswith("train.per_backbone.") for k in _COMMITTED_LEAVES)


def test_missing_key_message_gives_the_default_as_example(raw):
    with pytest.raises(ParamsError) as err:
        params_from_dict(_without(raw, "model.fpn_channels"), source="params.yaml")
    assert str(err.value) == ("params.yaml: missing key `model.fpn_channels`; "
                              "add it to params.yaml (for example `fpn_channels: 256`)")
    assert err.value.fix == "add it to params.yaml (for example `fpn_channels: 256`)"
    with pytest.raises(ParamsError, match=r"`seed:` takes an integer in \[0, 4294967295\]"):
        params_from_dict(_without(raw, "seed"))
    with pytest.raises(ParamsError, match=r"the `rpn:` section with the keys pre_nms_top_n_train, "):
        params_from_dict(_without(raw, "model.rpn"))


def test_missing_section_is_named_not_filled_in(raw):
    raw["train"]["val"] = {"interval": 1}
    with pytest.raises(ParamsError, match="missing key `train.val.unit`"):
        params_from_dict(raw)


def test_model_json_dict_must_hold_every_key():
    full = to_dict(ModelParams(fpn_channels=64))
    assert model_params_from_dict(full).fpn_channels == 64
    del full["roi"]["representation_size"]
    with pytest.raises(ParamsError, match=r"models/x/model.json: missing key `model.roi.representation_size`; "
                                          r"the file was written by an older mitdet; retrain"):
        model_params_from_dict(full, source="models/x/model.json")


def test_dataclass_defaults_still_build_objects_directly():
    assert TrainParams(epochs=2).epochs == 2
    assert ModelParams().fpn_channels == 256


def test_params_error_is_the_projects_error_class():
    assert issubclass(ParamsError, MitdetError) and issubclass(ParamsError, ValueError)
    assert ParamsError.exit_code == 2


def _write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_duplicate_key_is_refused_with_key_and_line(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    at = lines.index("  lr: 0.001")
    lines.insert(at + 2, "  lr: 0.01")
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, "\n".join(lines) + "\n"))
    message = str(err.value)
    assert "duplicate key `lr`" in message and f"line {at + 3}" in message and f"first at line {at + 1}" in message
    assert message.startswith(str(tmp_path / "params.yaml"))


@pytest.mark.parametrize("text, key", [
    ("seed: 0\nseed: 1\n", "seed"),
    ("train:\n  per_backbone:\n    mit_b1: {epochs: 2, epochs: 3}\n", "epochs"),
    ("data: {}\ndata: {}\n", "data"),
])
def test_duplicate_key_anywhere(tmp_path, text, key):
    with pytest.raises(ParamsError, match=rf"duplicate key `{key}` at line \d+"):
        load_params(_write(tmp_path, text))


@pytest.mark.parametrize("seed", [-5, 2**70, MAX_SEED + 1])
def test_seed_out_of_range(raw, seed):
    with pytest.raises(ParamsError, match=rf"`seed` = {seed} is out of range; allowed: \[0, {MAX_SEED}\]"):
        params_from_dict(_with(raw, "seed", seed))


def test_seed_bounds_are_accepted(raw):
    assert params_from_dict(_with(raw, "seed", MAX_SEED)).seed == 2**32 - 1
    assert params_from_dict(_with(raw, "seed", 0)).seed == 0
    with pytest.raises(ParamsError, match="`seed` must be an integer"):
        params_from_dict(_with(raw, "seed", 1.5))


@pytest.mark.parametrize("dotted", ["train.batch_size", "evaluate.batch_size", "train.per_backbone.mit_b5.batch_size"])
def test_batch_size_has_an_upper_bound(raw, dotted):
    assert MAX_BATCH_SIZE == 4096
    with pytest.raises(ParamsError, match=rf"batch_size` = {MAX_BATCH_SIZE + 1} is out of range; allowed: \[1, 4096\]"):
        params_from_dict(_with(raw, dotted, MAX_BATCH_SIZE + 1))
    assert params_from_dict(_with(raw, dotted, MAX_BATCH_SIZE))


@pytest.mark.parametrize("dotted, value", [
    ("train.grad_accum", MAX_BATCH_SIZE + 1),
    ("model.roi.representation_size", 2**20),
    ("data.synthetic.train_images", 10**7),
    ("train.overfit_batches", 10**6),
])
def test_other_sizes_have_upper_bounds(raw, dotted, value):
    with pytest.raises(ParamsError, match=rf"`{dotted}` = {value} is out of range"):
        params_from_dict(_with(raw, dotted, value))


def test_backbones_literal_comes_from_backbone_names():
    import typing
    (item,) = typing.get_args(typing.get_type_hints(Params)["backbones"])
    assert typing.get_args(item) == BACKBONE_NAMES


def test_backbone_names_match_the_mit_configs():
    from mitdet.models.mit import MIT_CONFIGS
    assert tuple(MIT_CONFIGS) == BACKBONE_NAMES


def test_per_backbone_overrides_apply_and_are_validated(raw):
    empty = {b: {} for b in raw["backbones"]}
    raw["train"]["per_backbone"] = {**empty, "mit_b5": {"batch_size": 2, "val": {"max_images": 7}}}
    params = params_from_dict(raw)
    b5 = params.train.for_backbone("mit_b5")
    assert (b5.batch_size, b5.val.max_images, b5.val.monitor) == (2, 7, params.train.val.monitor)
    assert params.train.for_backbone("mit_b0").batch_size == params.train.batch_size
    assert b5.per_backbone == {}

    raw["train"]["per_backbone"] = {**empty, "mit_b5": {"batchsize": 2}}
    with pytest.raises(ParamsError, match=r"train.per_backbone.mit_b5.batchsize"):
        params_from_dict(raw)
    raw["train"]["per_backbone"] = {**empty, "mit_b7": {"batch_size": 2}}
    with pytest.raises(ParamsError, match="unknown backbone 'mit_b7'"):
        params_from_dict(raw)
    raw["train"]["per_backbone"] = {b: {} for b in raw["backbones"][1:]}  # each train stage declares its entry
    with pytest.raises(ParamsError, match=r"`train.per_backbone` has no entry for mit_b0; add `mit_b0: \{\}`"):
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
