"""RGB+X training end to end: a tiny index with aux PNGs (jsonl `aux` keys, layout.json), a few steps, the saved
model, exact resume, and a forward/backward on real photos with generated aux images."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mitdet.engine import checkpoint as ckpt
from mitdet.engine.train import Hooks, Interrupted, train
from mitdet.models import load_inference_model
from mitdet.paths import BackbonePaths
from tests.train_fixtures import tiny_model, tiny_train, write_index

B = "mit_b0"
WITH_EVAL = dict(val={"interval": 3, "unit": "steps", "max_images": 3}, quick_eval={"interval": 2, "samples": 2})


def write_rgbx_index(root: Path, n_train: int = 6, n_val: int = 3, size: int = 64) -> str:
    """The train fixture's index plus a 16-bit thermal PNG per image (the squares warm, the rest cold), each
    line's `aux` key and layout.json with aux_channels 1, as build_index writes them."""
    index = write_index(root, n_train=n_train, n_val=n_val, size=size)
    aux_dir = root / "data" / "aux"
    aux_dir.mkdir()
    for split in ("train", "val"):
        lines = [json.loads(line) for line in (index / f"{split}.jsonl").read_text().splitlines()]
        for rec in lines:
            thermal = np.full((rec["height"], rec["width"]), 9000, np.uint16)
            for (x, y, w, h), label in zip(rec["boxes"], rec["labels"], strict=True):
                if label == 1:
                    thermal[int(y):int(y + h), int(x):int(x + w)] = 60000
            path = aux_dir / (Path(rec["file"]).stem + ".png")
            assert cv2.imwrite(str(path), thermal)
            rec["aux"] = str(path)
        (index / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (index / "layout.json").write_text(json.dumps({"tests": [], "aux_channels": 1}))
    return str(index)


def rgbx_model(fusion: str = "cmx"):
    return dataclasses.replace(tiny_model(), modality="rgbx", fusion=fusion)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> str:
    return write_rgbx_index(tmp_path_factory.mktemp("rgbx"))


def run(root: Path, index_dir: str, train_params, model=None, **kw) -> dict:
    cwd = os.getcwd()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    try:
        return train(B, train_params, model or rgbx_model(), seed=0, index_dir=index_dir, **kw)
    finally:
        os.chdir(cwd)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fusion", ["cmx", "concat", "switch", "guided"])
def test_rgbx_training_saves_a_model_that_rebuilds_with_its_aux_channels(tmp_path, index_dir, fusion):
    run(tmp_path, index_dir, tiny_train(epochs=1, max_steps=2), model=rgbx_model(fusion))
    p = BackbonePaths(B)
    spec = json.loads((tmp_path / p.model_json).read_text())
    assert spec["aux_channels"] == 1
    assert spec["model"]["modality"] == "rgbx" and spec["model"]["fusion"] == fusion
    weights = load_file(tmp_path / p.weights)
    assert weights["backbone.body.aux.patch_embed1.proj.weight"].shape[1] == 1
    model, _ = load_inference_model(tmp_path / p.model_dir)
    with torch.no_grad():
        out = model([torch.rand(4, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_rgbx_resume_is_bitwise_exact(tmp_path, index_dir):
    t = tiny_train(epochs=2, **WITH_EVAL)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, index_dir, t)
    with pytest.raises(Interrupted, match="interrupted at step 4"):
        run(resumed, index_dir, t, hooks=Hooks(should_stop=lambda step: step == 4))
    assert run(resumed, index_dir, t)["resumed_from_step"] == 4
    p = BackbonePaths(B)
    assert same_weights(load_file(straight / p.weights), load_file(resumed / p.weights))
    a = ckpt.load(straight / p.checkpoints / "last.pt")["model"]
    b = ckpt.load(resumed / p.checkpoints / "last.pt")["model"]
    assert same_weights(a, b)
    # the fusion's BatchNorm statistics ride in the state too
    assert any("fusions.0.ffm.channel_emb.norm.running_mean" in k for k in a)


def test_rgbx_forward_backward_on_real_photos_with_generated_aux(tmp_path, fixtures_dir):
    """COCO val2017 photos with a generated 2-channel aux (.npy: the photo's gray and its edges) through the
    loader: [5, H, W] items, the four losses finite, gradients in both streams."""
    from mitdet.data.dataset import build_loader
    from mitdet.data.index import ImageRecord, SplitIndex
    from mitdet.models import build_detector

    root = fixtures_dir / "coco2017-tiny50"
    gt = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    records = []
    for info in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        if not anns:
            continue
        file = root / "val2017" / info["file_name"]
        gray = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2GRAY)
        aux = tmp_path / f"{file.stem}.npy"
        np.save(aux, np.stack([gray, cv2.Canny(gray, 50, 150)], axis=2))
        boxes = np.array([a["bbox"] for a in anns], np.float32)
        boxes[:, 2:] += boxes[:, :2]
        n = len(anns)
        records.append(ImageRecord(info["id"], str(file), info["width"], info["height"], boxes,
                                   np.ones(n, np.int64), np.ones(n, np.int64), np.zeros(n, bool), aux=str(aux)))
        if len(records) == 2:
            break
    split = SplitIndex("train", records, [], aux_channels=2)
    params = dataclasses.replace(tiny_model(), modality="rgbx", min_size=160, max_size=256)
    images, targets, dropped = next(iter(build_loader(split, model=params, train=None, seed=0, training=False,
                                                      batch_size=2, num_workers=0)))
    assert dropped == 0 and [im.shape[0] for im in images] == [5, 5]
    assert all(im[3:].min() >= 0 and im[3:].max() <= 1 and im[3:].std() > 0 for im in images)
    torch.manual_seed(0)
    model = build_detector(B, 2, params, aux_channels=2).train()
    losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    assert len(losses) == 4 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for stream in ("rgb", "aux"):
        grad = model.backbone.body.get_submodule(stream).patch_embed1.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- predict --aux, export
@pytest.fixture(scope="module")
def rgbx_model_dir(tmp_path_factory, index_dir) -> Path:
    root = tmp_path_factory.mktemp("trained_rgbx")
    run(root, index_dir, tiny_train(epochs=1, max_steps=2))
    return root / BackbonePaths(B).model_dir


@pytest.fixture
def photos(tmp_path, index_dir) -> tuple[Path, Path]:
    """4 of the index's images in a folder with their aux PNGs in another; one aux missing, one of another size."""
    import shutil
    images, aux = tmp_path / "images", tmp_path / "aux"
    images.mkdir()
    aux.mkdir()
    for line in Path(index_dir, "train.jsonl").read_text().splitlines()[:4]:
        rec = json.loads(line)
        shutil.copy(rec["file"], images)
        shutil.copy(rec["aux"], aux)
    names = sorted(p.stem for p in images.iterdir())
    (aux / f"{names[0]}.png").unlink()
    assert cv2.imwrite(str(aux / f"{names[1]}.png"), np.zeros((32, 64), np.uint16))
    return images, aux


def test_predict_with_aux_skips_images_without_a_usable_aux_image(rgbx_model_dir, photos, tmp_path, capsys):
    from tests.cli_fixtures import run_cli
    images, aux = photos
    out = tmp_path / "pred.json"
    code, stdout, stderr = run_cli(["predict", str(images), "--model", str(rgbx_model_dir), "--aux", str(aux),
                                    "--out", str(out), "--workers", "0", "--score", "0"], capsys)
    assert code == 1, stderr  # files were skipped
    doc = json.loads(out.read_text())
    names = sorted(p.name for p in images.iterdir())
    assert sorted(im["file_name"] for im in doc["images"]) == names[2:]
    reasons = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert "no aux image" in reasons[names[0]] and "is 64x32, the image 64x64" in reasons[names[1]]
    assert doc["annotations"] and "2 file(s) skipped" in stderr

    code, _, stderr = run_cli(["predict", str(images), "--model", str(rgbx_model_dir), "--out", str(out)], capsys)
    assert code == 1 and "no image to predict" in stderr and "pass --aux FOLDER" in stderr


def test_predict_refuses_aux_for_an_rgb_model(photos, tmp_path, capsys):
    from mitdet.models import build_detector, save_inference_model
    from tests.cli_fixtures import run_cli
    rgb = build_detector(B, 3, tiny_model())
    spec = {"backbone": B, "num_classes": 3, "model": dataclasses.asdict(tiny_model()),
            "categories": [{"id": 3, "name": "square", "label": 1}, {"id": 7, "name": "disc", "label": 2}]}
    save_inference_model(rgb, spec, tmp_path / "rgb")
    images, aux = photos
    code, _, stderr = run_cli(["predict", str(images), "--model", str(tmp_path / "rgb"), "--aux", str(aux),
                               "--out", str(tmp_path / "p.json")], capsys)
    assert code == 1 and "the model is RGB-only; --aux is for RGB+X models" in stderr


def test_rgbx_onnx_export_takes_rgb_and_aux_channels(rgbx_model_dir, photos, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from tests.cli_fixtures import run_cli
    images, aux = photos
    out = tmp_path / "rgbx.onnx"
    code, stdout, stderr = run_cli(["export", str(out), "--model", str(rgbx_model_dir), "--check-images",
                                    str(images), "--check-aux", str(aux)], capsys)
    assert code == 0, stderr
    assert "float32 [1, 3 + 1, height, width]" in stdout and "checked on 2 image(s)" in stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[:2] == [1, 4]
    model, _ = load_inference_model(rgbx_model_dir)
    x = np.random.default_rng(0).random((1, 4, 72, 90), dtype=np.float32)
    boxes, scores, labels = session.run(None, {"image": x})
    from mitdet.models.export import OnnxRgbxDetector
    with torch.no_grad():
        ref = OnnxRgbxDetector(model, 64, 64)(torch.from_numpy(x))
    assert len(scores) == len(ref[1])
    np.testing.assert_allclose(scores, ref[1].numpy(), atol=1e-4)
    assert boxes.shape == (len(scores), 4) and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 72).all()
