"""RGB+X model: the dual-stream MiT (every variant x fusion), its detector, pretrained init, the saved model."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mitdet.models import build_detector, build_mit, count_parameters, detector_gflops, load_inference_model
from mitdet.models import save_inference_model
from mitdet.models.mit import MIT_CONFIGS
from mitdet.models.rgbx import FUSIONS, build_rgbx, run_stage
from mitdet.params import ModelParams, RoiParams, RpnParams


def small_params(**overrides) -> ModelParams:
    return dataclasses.replace(ModelParams(
        drop_path_rate=0.1, fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128], min_size=64, max_size=96,
        rpn=RpnParams(pre_nms_top_n_train=100, pre_nms_top_n_test=100, post_nms_top_n_train=50,
                      post_nms_top_n_test=50, batch_size_per_image=32),
        roi=RoiParams(batch_size_per_image=32, score_thresh=0.0, detections_per_img=10)), **overrides)


def rgbx_params(fusion: str = "cmx", **overrides) -> ModelParams:
    return small_params(modality="rgbx", fusion=fusion, **overrides)


def fusion_parameters(fusion: str, d: int) -> int:
    """Parameters of one stage's fusion module for width d, counted by hand from CMX's layer list."""
    if fusion == "add":
        return 0
    if fusion == "concat":
        return 2 * d * d + d
    spatial = 4 * 7 * 7 + 1  # 7x7 conv over [mean, max] of both streams -> one map
    if fusion == "switch":
        return 2 * (d * d + d) + spatial  # a 1x1 gate conv per stream
    if fusion == "guided":
        return (2 * d * d + d) + spatial  # 1x1 channel attention over both streams' context
    channel_weights = (4 * d * 4 * d + 4 * d) + (4 * d * 2 * d + 2 * d)
    spatial_weights = (2 * d * d + d) + (d * 2 + 2)
    cross_path = 2 * (d * 2 * d + 2 * d) + 2 * (d * 2 * d) + 2 * (2 * d * d + d) + 2 * (2 * d)
    channel_embed = 2 * d * d + (2 * d * d + d) + (9 * d + d) + (d * d + d) + 2 * d + 2 * d
    return channel_weights + spatial_weights + cross_path + channel_embed


@pytest.mark.parametrize("backbone", list(MIT_CONFIGS))
def test_every_variant_and_fusion_gives_mit_shaped_maps_and_its_parameter_count(backbone):
    cfg = MIT_CONFIGS[backbone]
    with torch.device("meta"):  # shapes and counts without initialising 80M weights
        plain = count_parameters(build_mit(backbone))
        for fusion in FUSIONS:
            for n in ((1, 2) if backbone == "mit_b0" else (2,)):
                encoder = build_rgbx(backbone, n, fusion).eval()
                outs = encoder(torch.empty(2, 3 + n, 64, 96))
                assert [tuple(o.shape) for o in outs] == [(2, c, 64 // s, 96 // s) for c, s in
                                                          zip(cfg.embed_dims, (4, 8, 16, 32), strict=True)]
                assert encoder.out_channels == list(cfg.embed_dims)
                first = cfg.embed_dims[0] * cfg.patch_sizes[0] ** 2  # weights per input channel of patch_embed1
                expected = 2 * plain + (n - 3) * first + sum(fusion_parameters(fusion, d) for d in cfg.embed_dims)
                assert count_parameters(encoder) == expected, (fusion, n)


def test_the_rgb_stream_is_segformers_encoder_with_the_same_initial_weights():
    torch.manual_seed(0)
    plain = build_mit("mit_b0", drop_path_rate=0.1)
    torch.manual_seed(0)
    dual = build_rgbx("mit_b0", 2, "cmx", drop_path_rate=0.1)
    a, b = plain.state_dict(), dual.rgb.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dual.aux.patch_embed1.proj.weight.shape[1] == 2
    # the stages as the dual encoder runs them are the MiT forward, map for map
    x = torch.rand(1, 3, 64, 64)
    plain.eval()
    with torch.no_grad():
        maps, h = [], x
        for i in range(1, 5):
            h = run_stage(plain, i, h)
            maps.append(h)
        assert all(torch.equal(m, r) for m, r in zip(maps, plain(x), strict=True))


def state_digest(model) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode() + str(tuple(value.shape)).encode() + value.detach().contiguous().numpy().tobytes())
    h.update(torch.rand(4).numpy().tobytes())  # and the random stream after the build: as many init draws
    return h.hexdigest()[:16]


def test_an_rgb_build_is_bitwise_the_model_from_before_rgbx():
    torch.manual_seed(0)
    model = build_detector("mit_b0", 5, ModelParams(fpn_channels=32))
    # pinned before RGB+X landed (same parameter order, values and init draws)
    assert state_digest(model) == "a1ab873ae0e50f2d"
    assert model.transform.image_mean == [0.485, 0.456, 0.406] and len(model.transform.image_std) == 3


@pytest.mark.parametrize("fusion", FUSIONS)
def test_rgbx_detector_trains_with_gradients_in_both_streams_and_the_fusion(fusion):
    torch.manual_seed(0)
    model = build_detector("mit_b0", 3, rgbx_params(fusion), aux_channels=2).train()
    images = [torch.rand(5, 64, 96), torch.rand(5, 80, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 70.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    names = ["backbone.body.rgb.patch_embed1.proj.weight", "backbone.body.aux.patch_embed1.proj.weight",
             "backbone.body.rgb.block4.1.mlp.fc2.weight", "backbone.body.aux.block4.1.mlp.fc2.weight",
             "backbone.fpn.layer_blocks.0.0.weight"]
    names += {"cmx": ["backbone.body.fusions.0.frm.channel_weights.mlp.0.weight",
                      "backbone.body.fusions.2.frm.spatial_weights.mlp.0.weight",
                      "backbone.body.fusions.1.ffm.cross.cross_attn.kv1.weight",
                      "backbone.body.fusions.3.ffm.channel_emb.residual.weight"],
              "concat": [f"backbone.body.fusions.{i}.proj.weight" for i in range(4)], "add": [],
              "switch": [f"backbone.body.fusions.{i}.{m}.weight" for i in range(4)
                         for m in ("gate_rgb", "gate_aux", "spatial")],
              "guided": [f"backbone.body.fusions.{i}.{m}.weight" for i in range(4) for m in ("channel", "spatial")]
              }[fusion]
    for name in names:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(5, 64, 96)])
    assert len(out[0]["boxes"]) == 10


def test_rgbx_input_normalisation_frozen_stages_and_flops():
    model = build_detector("mit_b0", 3, rgbx_params(aux_mean=[0.4, 0.3], aux_std=[0.2, 0.1], frozen_stages=2),
                           aux_channels=2)
    assert model.transform.image_mean == [0.485, 0.456, 0.406, 0.4, 0.3]
    assert model.transform.image_std == [0.229, 0.224, 0.225, 0.2, 0.1]
    one = build_detector("mit_b0", 3, rgbx_params(), aux_channels=3)
    assert one.transform.image_mean[3:] == [0.5] * 3 and one.transform.image_std[3:] == [0.5] * 3
    body = model.backbone.body
    for stream in (body.rgb, body.aux):  # frozen_stages applies to both streams; the fusion modules train
        assert not any(p.requires_grad for p in stream.block2.parameters())
        assert all(p.requires_grad for p in stream.block3.parameters())
    assert all(p.requires_grad for p in body.fusions.parameters())
    model.train()
    assert not body.aux.block1[0].training and body.aux.block3[0].training
    rgb = build_detector("mit_b0", 3, small_params())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        build_mit("mit_b0")(torch.rand(1, 3, 64, 96))
    encoder = counter.get_total_flops() / 1e9
    # a 5-channel image through a second stream and the fusion modules: at least one more encoder's work
    assert detector_gflops(model, 64, 96) - detector_gflops(rgb, 64, 96) > 0.9 * encoder > 0


def test_inconsistent_rgbx_settings_are_refused():
    with pytest.raises(ValueError, match="aux_channels must be at least 1"):
        build_detector("mit_b0", 3, rgbx_params(), aux_channels=0)
    with pytest.raises(ValueError, match="aux_mean needs 1 or 2 values"):
        build_detector("mit_b0", 3, rgbx_params(aux_mean=[0.1, 0.2, 0.3]), aux_channels=2)
    with pytest.raises(ValueError, match="modality rgb takes no aux channels"):
        build_detector("mit_b0", 3, small_params(), aux_channels=2)
    encoder = build_rgbx("mit_b0", 2)
    with pytest.raises(ValueError, match="takes 3 \\+ 2 channels; got 4"):
        encoder(torch.rand(1, 4, 32, 32))


def nvlabs_checkpoint(seed: int) -> dict:
    """What NVlabs' mit_b0.pth holds: an encoder's tensors and an ImageNet head."""
    torch.manual_seed(seed)
    state = dict(build_mit("mit_b0").state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
    return state


@pytest.mark.parametrize("channels", [1, 2])
def test_pretrained_initialises_both_streams_from_one_segformer_checkpoint(tmp_path, channels):
    source = nvlabs_checkpoint(1)
    torch.save({"state_dict": source}, tmp_path / "mit_b0.pth")
    torch.manual_seed(0)
    fresh = build_detector("mit_b0", 3, rgbx_params(), aux_channels=channels)
    torch.manual_seed(0)
    model = build_detector("mit_b0", 3, rgbx_params(pretrained=str(tmp_path / "{backbone}.pth")),
                           aux_channels=channels)
    body = model.backbone.body
    rgb, aux = body.rgb.state_dict(), body.aux.state_dict()
    assert all(torch.equal(rgb[k], source[k]) for k in rgb)
    first = "patch_embed1.proj.weight"
    assert all(torch.equal(aux[k], source[k]) for k in aux if k != first)
    w = source[first]
    assert aux[first].shape == (32, channels, 7, 7)
    for c in range(channels):  # the RGB filters' mean, times 3 / N
        assert torch.allclose(aux[first][:, c], w.mean(dim=1) * 3 / channels)
    # N equal aux channels: the response the RGB filters give to the same gray image
    gray = torch.rand(1, 1, 16, 16)
    conv = torch.nn.functional.conv2d
    assert torch.allclose(conv(gray.expand(1, channels, 16, 16), aux[first], padding=3),
                          conv(gray.expand(1, 3, 16, 16), w, padding=3), atol=1e-5)
    fused, fresh_fused = body.fusions.state_dict(), fresh.backbone.body.fusions.state_dict()
    assert all(torch.equal(fused[k], fresh_fused[k]) for k in fused)  # fusion modules keep their own init


def test_pretrained_rgbx_from_hugging_face_format_and_a_wrong_variant(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    torch.manual_seed(3)
    config = transformers.SegformerConfig(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_labels=1000)
    transformers.SegformerForImageClassification(config).save_pretrained(tmp_path / "hub")
    model = build_detector("mit_b0", 3, rgbx_params(pretrained=str(tmp_path / "hub")), aux_channels=2)
    plain = build_mit("mit_b0")
    from mitdet.models import load_pretrained
    load_pretrained(plain, str(tmp_path / "hub"))
    expected = plain.state_dict()
    got = model.backbone.body.aux.state_dict()
    assert torch.equal(got["block2.1.attn.kv.weight"], expected["block2.1.attn.kv.weight"])
    assert torch.allclose(got["patch_embed1.proj.weight"][:, 1],
                          expected["patch_embed1.proj.weight"].mean(dim=1) * 1.5)
    from mitdet.models import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="mit_b0"):
        build_detector("mit_b1", 3, rgbx_params(pretrained=str(tmp_path / "hub")), aux_channels=2)


def test_rgbx_inference_model_round_trips_and_an_older_model_json_loads_as_rgb(tmp_path):
    torch.manual_seed(0)
    params = rgbx_params("cmx")
    model = build_detector("mit_b0", 3, params, aux_channels=2).eval()
    cats = [{"id": 1, "name": "warm", "label": 1}, {"id": 2, "name": "cold", "label": 2}]
    save_inference_model(model, {"backbone": "mit_b0", "num_classes": 3, "categories": cats,
                                 "model": dataclasses.asdict(params)}, tmp_path / "rgbx")
    written = json.loads((tmp_path / "rgbx" / "model.json").read_text())
    assert written["aux_channels"] == 2
    assert written["model"]["modality"] == "rgbx" and written["model"]["fusion"] == "cmx"
    loaded, spec = load_inference_model(tmp_path / "rgbx")
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    images = [torch.rand(5, 64, 96)]
    with torch.no_grad():
        # same weights, but the loaded ones lie at safetensors' offsets: the one-row matrix products of the
        # channel weights' MLP may then sum in another order (last-bit differences)
        for e, g in zip(model(images), loaded(images), strict=True):
            assert torch.equal(e["labels"], g["labels"])
            assert torch.allclose(e["boxes"], g["boxes"], atol=1e-3) and torch.allclose(e["scores"], g["scores"],
                                                                                        atol=1e-5)
    assert spec["aux_channels"] == 2 and len(loaded.transform.image_mean) == 5

    rgb_params = small_params()
    rgb = build_detector("mit_b0", 3, rgb_params).eval()
    save_inference_model(rgb, {"backbone": "mit_b0", "num_classes": 3, "categories": cats,
                               "model": dataclasses.asdict(rgb_params)}, tmp_path / "old")
    old = json.loads((tmp_path / "old" / "model.json").read_text())
    del old["aux_channels"]
    for key in ("modality", "fusion", "aux_mean", "aux_std"):
        del old["model"][key]
    (tmp_path / "old" / "model.json").write_text(json.dumps(old))
    loaded, spec = load_inference_model(tmp_path / "old")
    assert spec["aux_channels"] == 0 and spec["model"]["modality"] == "rgb"
    with torch.no_grad():
        x = [torch.rand(3, 64, 64)]
        assert torch.equal(rgb(x)[0]["boxes"], loaded(x)[0]["boxes"])
