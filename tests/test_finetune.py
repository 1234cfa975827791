"""Fine-tuning: a training that starts from a trained mitdet model folder (same or other categories), and one
model.pretrained value for six backbones."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from mitdet.data.dataset import build_loader
from mitdet.data.index import load_split
from mitdet.engine.train import train, validate
from mitdet.errors import CheckpointError
from mitdet.models import build_detector
from mitdet.models.bundle import PREDICTOR_PREFIX, init_from_model, load_inference_model
from mitdet.models.pretrained import pretrained_for
from mitdet.paths import BackbonePaths
from tests.train_fixtures import tiny_model, tiny_train, write_index

B = "mit_b0"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, str]:
    """A tiny model trained a few steps: (its model folder, its index)."""
    root = tmp_path_factory.mktemp("source")
    index = str(write_index(root, n_train=8, n_val=4, size=64))
    out = BackbonePaths(B)
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train(B, tiny_train(max_steps=6, lr=3e-3), tiny_model(), seed=0, index_dir=index)
    finally:
        os.chdir(cwd)
    return root / out.model_dir, index


def val_ap(model, index: str) -> dict:
    split = load_split(index, "val")
    loader = build_loader(split, model=tiny_model(), train=None, seed=0, training=False, batch_size=2,
                          num_workers=0)
    return validate(model, loader, "cpu", "off", {c.label: c.id for c in split.categories},
                    str(Path(index) / "instances_val.json"), step=0)


def test_same_categories_start_exactly_where_the_source_is(source):
    model_dir, index = source
    trained, _ = load_inference_model(model_dir)
    fresh = build_detector(B, 3, tiny_model())
    rebuilt = init_from_model(fresh, model_dir, load_split(index, "train").categories)
    assert not rebuilt
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert val_ap(fresh, index) == val_ap(trained, index)


def test_other_categories_keep_every_weight_but_the_box_predictor(source, tmp_path):
    model_dir, index = source
    other = Path(write_index(tmp_path, n_train=8, n_val=4, size=64))
    cats = json.loads((other / "categories.json").read_text()) + [{"id": 9, "name": "triangle", "label": 3}]
    (other / "categories.json").write_text(json.dumps(cats))
    categories = load_split(str(other), "train").categories
    fresh = build_detector(B, len(categories) + 1, tiny_model())
    before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith(PREDICTOR_PREFIX)}
    assert init_from_model(fresh, model_dir, categories)
    trained, _ = load_inference_model(model_dir)
    for k, v in fresh.state_dict().items():
        if k.startswith(PREDICTOR_PREFIX):
            assert torch.equal(v, before[k]) and v.shape[0] in (4, 16)  # 3 classes + background, fresh init
        else:
            assert torch.equal(v, trained.state_dict()[k]), k


def test_training_from_a_model_folder_through_params(source, tmp_path, monkeypatch, caplog):
    model_dir, index = source
    monkeypatch.chdir(tmp_path)
    model = dataclasses.replace(tiny_model(), pretrained=str(model_dir))
    with caplog.at_level(logging.INFO, logger="mitdet"):
        result = train(B, tiny_train(max_steps=1), model, seed=0, index_dir=index)
    assert result["steps"] == 1
    assert any("starting from the trained model" in r.getMessage() for r in caplog.records)


def test_a_model_of_another_backbone_is_refused(source):
    model_dir, index = source
    other = build_detector("mit_b1", 3, tiny_model())
    with pytest.raises(CheckpointError, match="does not fit this detector"):
        init_from_model(other, model_dir, load_split(index, "train").categories)


def test_one_pretrained_value_names_each_backbones_file():
    assert pretrained_for("weights/{backbone}.pth", "mit_b3") == "weights/mit_b3.pth"
    assert pretrained_for("hf/nvidia/{backbone_dashed}", "mit_b5") == "hf/nvidia/mit-b5"
    assert pretrained_for("/data/mit_b0.pth", "mit_b2") == "/data/mit_b0.pth"


def test_a_loaded_model_predicts_exactly_as_the_one_saved(source):
    """load_inference_model builds on the meta device (no random init) and assigns the weights: same outputs."""
    model_dir, _ = source
    trained, spec = load_inference_model(model_dir)
    from mitdet.params import model_params_from_dict
    reference = build_detector(B, spec["num_classes"], model_params_from_dict(spec["model"]))
    from safetensors.torch import load_file
    reference.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    reference.eval()
    for m in (trained, reference):
        m.roi_heads.score_thresh = 0.0  # a full list of detections to compare
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a, b = trained(images)[0], reference(images)[0]
    assert len(a["boxes"]) > 0 and all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
