"""MiT encoder: stage shapes and strides, parameter counts, frozen stages, stochastic depth, SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mitdet.models import MIT_CONFIGS, build_mit

# SegFormer's encoders without a classification head, in millions of parameters.
REFERENCE_PARAMS_M = {"mit_b0": 3.32, "mit_b1": 13.15, "mit_b2": 24.20, "mit_b3": 44.07, "mit_b4": 60.84,
                      "mit_b5": 81.44}
EMBED_DIMS = {"mit_b0": [32, 64, 160, 256], **{f"mit_b{i}": [64, 128, 320, 512] for i in range(1, 6)}}


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS_M))
def test_every_stage_has_its_stride_and_width_and_the_parameter_count_matches(name):
    torch.manual_seed(0)
    encoder = build_mit(name).eval()
    assert encoder.out_channels == EMBED_DIMS[name]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = encoder(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s)
                                               for c, s in zip(EMBED_DIMS[name], (4, 8, 16, 32), strict=True)]
    assert all(torch.isfinite(f).all() for f in feats)
    millions = sum(p.numel() for p in encoder.parameters()) / 1e6
    assert abs(millions - REFERENCE_PARAMS_M[name]) / REFERENCE_PARAMS_M[name] < 0.005, millions


def test_odd_input_sizes_round_up_like_segformer():
    encoder = build_mit("mit_b0").eval()
    with torch.no_grad():
        feats = encoder(torch.randn(1, 3, 70, 45))
    # each overlapping patch embedding is a conv with padding k // 2: out = floor((n - 1) / stride) + 1
    assert [tuple(f.shape[-2:]) for f in feats] == [(18, 12), (9, 6), (5, 3), (3, 2)]


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="mit_b0, mit_b1"):
        build_mit("mit_b9")
    with pytest.raises(ValueError, match="frozen_stages"):
        build_mit("mit_b0", frozen_stages=5)


def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    torch.manual_seed(0)
    encoder = build_mit("mit_b0", drop_path_rate=0.3, frozen_stages=2)
    encoder.train()
    frozen = ["patch_embed1", "block1", "norm1", "patch_embed2", "block2", "norm2"]
    trainable = ["patch_embed3", "block3", "norm3", "patch_embed4", "block4", "norm4"]
    for name in frozen:
        module = getattr(encoder, name)
        assert all(not m.training for m in module.modules()), name
        assert all(not p.requires_grad for p in module.parameters()), name
    for name in trainable:
        assert all(m.training for m in getattr(encoder, name).modules()), name

    feats = encoder(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in feats).backward()
    for name in frozen:
        assert all(p.grad is None for p in getattr(encoder, name).parameters()), name
    for name in trainable:
        grads = [p.grad for p in getattr(encoder, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name

    # a later train() (as a training loop calls each epoch) must not wake the frozen stages
    encoder.eval().train()
    assert not encoder.block1[0].norm1.training and not encoder.norm2.training
    assert encoder.block3[0].norm1.training


def test_frozen_stages_zero_freezes_nothing_and_four_freezes_everything():
    assert all(p.requires_grad for p in build_mit("mit_b0", frozen_stages=0).parameters())
    assert not any(p.requires_grad for p in build_mit("mit_b0", frozen_stages=4).parameters())


def test_drop_path_rates_increase_linearly_and_act_only_in_training():
    torch.manual_seed(0)
    encoder = build_mit("mit_b0", drop_path_rate=0.5)
    blocks = [b for i in range(1, 5) for b in getattr(encoder, f"block{i}")]
    rates = [getattr(b.drop_path, "p", 0.0) for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert rates == sorted(rates) and len(set(rates)) == len(rates)

    x = torch.randn(4, 3, 64, 64)
    encoder.eval()
    with torch.no_grad():
        a, b = encoder(x)[-1], encoder(x)[-1]
    assert torch.equal(a, b)  # eval: deterministic
    encoder.train()
    with torch.no_grad():
        torch.manual_seed(1)
        c = encoder(x)[-1]
        torch.manual_seed(2)
        d = encoder(x)[-1]
    assert not torch.allclose(c, d)  # training: whole residual branches dropped at random

    plain = build_mit("mit_b0", drop_path_rate=0.0)
    plain.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.train()(x)[-1], plain.eval()(x)[-1])  # no drop path: train == eval


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    encoder = build_mit("mit_b0").eval()
    with torch.no_grad():
        encoder(torch.randn(1, 3, 64, 64))
    assert len(calls) == sum(MIT_CONFIGS["mit_b0"].depths)
    # [batch, heads, tokens, head_dim] of stage 1: one head over the 16 x 16 grid of 32 channels
    assert tuple(calls[0]) == (1, 1, 256, 32)
