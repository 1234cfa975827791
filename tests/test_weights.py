"""Checkpoint import (original mit_b*.pth, Hugging Face nvidia/mit-b*), strict errors, URLs, inference files."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from mitdet.models import (CheckpointMismatchError, build_detector, build_mit, load_inference_model, load_pretrained,
                           save_inference_model)
from mitdet.params import ModelParams, RoiParams, RpnParams


def original_checkpoint(encoder) -> dict:
    """What NVlabs' mit_b*.pth holds: the encoder's tensors plus the ImageNet classifier `head.*`."""
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    state["head.weight"] = torch.randn(1000, encoder.out_channels[-1])
    state["head.bias"] = torch.randn(1000)
    return state


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def source():
    torch.manual_seed(1)
    return build_mit("mit_b0").eval()


@pytest.fixture
def target():
    torch.manual_seed(2)
    return build_mit("mit_b0").eval()


def test_original_segformer_checkpoint_with_head_and_state_dict_wrapper_loads(source, target, tmp_path):
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": original_checkpoint(source), "meta": {"epoch": 300}}, path)
    assert not same_weights(source, target)
    load_pretrained(target, str(path))
    assert same_weights(source, target)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source(x), target(x), strict=True))


def test_plain_and_module_prefixed_checkpoints_load(source, target, tmp_path):
    torch.save({"module." + k: v for k, v in original_checkpoint(source).items()}, tmp_path / "ddp.pth")
    load_pretrained(target, str(tmp_path / "ddp.pth"))
    assert same_weights(source, target)


def hf_classifier(seed: int):
    """A random SegformerForImageClassification shaped as nvidia/mit-b0 (what the Hub publishes)."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    torch.manual_seed(seed)
    config = transformers.SegformerConfig(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_labels=1000)
    return transformers.SegformerForImageClassification(config).eval()


def test_hugging_face_safetensors_and_bin_load_the_same_weights(tmp_path):
    hf = hf_classifier(3)
    hf.save_pretrained(tmp_path / "hub")
    hub = load_file(str(tmp_path / "hub" / "model.safetensors"))
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in hub and "classifier.weight" in hub
    torch.save(hub, tmp_path / "pytorch_model.bin")  # the older .bin layout of the same names
    save_file({k.removeprefix("segformer."): v for k, v in hub.items()}, str(tmp_path / "no_prefix.safetensors"))

    loaded = []
    for name in ("hub/model.safetensors", "pytorch_model.bin", "no_prefix.safetensors", "hub"):
        encoder = build_mit("mit_b0")
        load_pretrained(encoder, str(tmp_path / name))
        loaded.append(encoder)
    assert all(same_weights(loaded[0], other) for other in loaded[1:])
    state = loaded[0].state_dict()
    # keys and values are two linears in HF, one kv linear (keys first) in SegFormer
    prefix = "segformer.encoder.block.2.1.attention.self."
    assert torch.equal(state["block3.1.attn.kv.weight"],
                       torch.cat([hub[prefix + "key.weight"], hub[prefix + "value.weight"]]))
    assert torch.equal(state["block3.1.attn.sr.weight"], hub[prefix + "sr.weight"])
    assert torch.equal(state["norm4.bias"], hub["segformer.encoder.layer_norm.3.bias"])
    assert torch.equal(state["patch_embed1.norm.weight"],
                       hub["segformer.encoder.patch_embeddings.0.layer_norm.weight"])


def test_transformers5_module_names_load_too(tmp_path):
    hf = hf_classifier(4)
    torch.save(hf.segformer.state_dict(), tmp_path / "in_memory.pt")  # stages.0.blocks.0.attention.q_proj...
    hf.save_pretrained(tmp_path / "hub")
    a, b = build_mit("mit_b0"), build_mit("mit_b0")
    load_pretrained(a, str(tmp_path / "in_memory.pt"))
    load_pretrained(b, str(tmp_path / "hub" / "model.safetensors"))
    assert same_weights(a, b)


def test_missing_unexpected_and_misshaped_keys_are_listed_and_nothing_is_loaded(source, target, tmp_path):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = original_checkpoint(source)
    del state["block2.1.attn.kv.bias"]
    state["block1.0.attn.extra.weight"] = torch.zeros(3)
    state["norm3.weight"] = torch.ones(161)
    torch.save(state, tmp_path / "bad.pth")

    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(target, str(tmp_path / "bad.pth"))
    err = info.value
    assert err.missing == ["block2.1.attn.kv.bias"]
    assert err.unexpected == ["block1.0.attn.extra.weight"]
    assert err.mismatched == [("norm3.weight", (161,), (160,))]
    message = str(err)
    for text in ("bad.pth", "mit_b0", "missing keys (1): block2.1.attn.kv.bias",
                 "unexpected keys (1): block1.0.attn.extra.weight",
                 "norm3.weight (checkpoint [161] vs model [160])", "nothing was loaded"):
        assert text in message, (text, message)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_a_checkpoint_of_another_variant_is_refused_with_its_shapes(tmp_path):
    torch.save(build_mit("mit_b1").state_dict(), tmp_path / "mit_b1.pth")
    with pytest.raises(CheckpointMismatchError, match=r"looks like mit_b1(.|\n)*shape mismatches \(176\)"):
        load_pretrained(build_mit("mit_b0"), str(tmp_path / "mit_b1.pth"))
    torch.save(build_mit("mit_b2").state_dict(), tmp_path / "mit_b2.pth")
    with pytest.raises(CheckpointMismatchError, match=r"looks like mit_b2(.|\n)*unexpected keys \(\d+\): block1\.2\."):
        load_pretrained(build_mit("mit_b1"), str(tmp_path / "mit_b2.pth"))


class NotAWeight:
    """Any class: unpickling it would mean running code from the checkpoint."""


def test_pickled_code_is_refused_and_missing_or_broken_files_are_named(target, tmp_path):
    torch.save({"state_dict": target.state_dict(), "trainer": NotAWeight()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth: not a readable weights-only checkpoint"):
        load_pretrained(target, str(tmp_path / "pickled.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(target, str(tmp_path / "nope.pth"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
        load_pretrained(target, str(tmp_path / "cut.safetensors"))


@pytest.fixture
def http_dir(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_weights_from_a_url_are_downloaded_once_into_the_cache(source, target, tmp_path, http_dir):
    www, base = http_dir
    torch.save({"state_dict": original_checkpoint(source)}, www / "mit_b0.pth")
    cache = tmp_path / "cache"
    load_pretrained(target, f"{base}/mit_b0.pth", cache=cache)
    assert same_weights(source, target)
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("mit_b0.pth")

    (www / "mit_b0.pth").unlink()  # a second load reads the cache, not the server
    again = build_mit("mit_b0")
    load_pretrained(again, f"{base}/mit_b0.pth", cache=cache)
    assert same_weights(source, again)

    with pytest.raises(OSError, match="could not download pretrained weights from .*/absent.pth"):
        load_pretrained(target, f"{base}/absent.pth", cache=cache)
    assert len(list(cache.iterdir())) == 1  # no partial file left behind


def tiny_model_params(**overrides) -> ModelParams:
    return dataclasses.replace(ModelParams(
        drop_path_rate=0.1, fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128], min_size=64, max_size=96,
        rpn=RpnParams(pre_nms_top_n_test=100, post_nms_top_n_test=50),
        roi=RoiParams(score_thresh=0.0, detections_per_img=20)), **overrides)


def test_inference_model_round_trips_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    params = tiny_model_params()
    model = build_detector("mit_b0", 4, params).eval()
    categories = [{"id": 3, "name": "car", "label": 1}, {"id": 7, "name": "train", "label": 2},
                  {"id": 9, "name": "boat", "label": 3}]
    spec = {"backbone": "mit_b0", "num_classes": 4, "categories": categories,
            "model": dataclasses.asdict(params)}
    save_inference_model(model, spec, tmp_path / "model")
    written = json.loads((tmp_path / "model" / "model.json").read_text())
    assert written["format"] == "mitdet-detector-v1" and written["categories"] == categories
    assert written["model"]["fpn_channels"] == 32 and written["num_classes"] == 4

    loaded, loaded_spec = load_inference_model(tmp_path / "model")
    assert not loaded.training and loaded_spec == written
    images = [torch.rand(3, 70, 90), torch.rand(3, 96, 64)]
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert len(expected[0]["boxes"]) == 20  # score_thresh 0: a full list to compare
    for e, g in zip(expected, got, strict=True):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(e[key], g[key]), key


def test_inference_model_spec_must_be_complete(tmp_path):
    model = build_detector("mit_b0", 3, tiny_model_params())
    with pytest.raises(ValueError, match="categories"):
        save_inference_model(model, {"backbone": "mit_b0", "num_classes": 3, "model": {}}, tmp_path)
    assert not any(tmp_path.iterdir())
