"""Our MiT is SegFormer's: Hugging Face's SegformerModel, saved with save_pretrained and imported through
load_pretrained, gives the same four feature maps for every variant (float32).

The remaining difference (about 4.5e-6 of the maps' norm) is the LayerNorm epsilon: SegFormer (NVlabs) builds
the block and stage norms with eps=1e-6, which we keep because the ImageNet weights were trained so, while
transformers uses LayerNorm's default 1e-5. With the epsilon set to transformers' the maps agree to ~1e-6.
"""
from __future__ import annotations

import pytest
import torch

from mitdet.models import build_mit, load_pretrained
from mitdet.models.mit import MIT_CONFIGS

transformers = pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")

VARIANTS = list(MIT_CONFIGS)  # all six take about 10 s together at 64 x 64 on 2 cores


def hf_model(name: str):
    """A randomly initialised SegformerModel with the published nvidia/mit-b* configuration of `name`."""
    c = MIT_CONFIGS[name]
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, hidden_sizes=list(c.embed_dims), depths=list(c.depths),
        num_attention_heads=list(c.num_heads), sr_ratios=list(c.sr_ratios), patch_sizes=list(c.patch_sizes),
        strides=list(c.strides), mlp_ratios=[c.mlp_ratio] * 4, hidden_act="gelu", drop_path_rate=0.0)
    model = transformers.SegformerModel(config).eval()
    # Hugging Face initialises every norm to (1, 0) and biases to 0: perturb all parameters so that a swapped or
    # mis-mapped tensor cannot go unnoticed.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """|ours - ref| / |ref| over the whole map (element-wise ratios explode where values are near zero)."""
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", VARIANTS)
def test_feature_maps_match_transformers_segformer(name, tmp_path):
    torch.manual_seed(0)
    reference = hf_model(name)
    reference.save_pretrained(tmp_path)  # the Hub's key names, as a safetensors file
    assert (tmp_path / "model.safetensors").is_file()

    ours = build_mit(name).eval()
    load_pretrained(ours, str(tmp_path / "model.safetensors"))

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states
        got = ours(x)
    assert len(expected) == len(got) == 4
    for stage, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        assert a.shape == b.shape, (stage, a.shape, b.shape)
        assert relative_error(a, b) < 1e-5, (name, stage, relative_error(a, b))

    # the whole remaining gap is the LayerNorm epsilon (see the module docstring)
    for module in ours.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    with torch.no_grad():
        got = ours(x)
    assert max(relative_error(a, b) for a, b in zip(got, expected, strict=True)) < 3e-6
