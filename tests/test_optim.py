"""Parameter groups and learning-rate schedules (mitdet.engine.optim)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mitdet.engine.optim import Schedule, build_optimizer, lr_factor, param_groups
from mitdet.params import TrainParams


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8, 8))  # 4-D: decay would apply by shape alone
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


class Toy(nn.Module):
    """Named like torchvision's FasterRCNN: backbone.body (encoder), backbone.fpn, roi_heads."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = Encoder()
        self.backbone.fpn = nn.Conv2d(8, 8, 1)
        self.roi_heads = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Embedding(5, 8))


def groups_by_name(model, **kw):
    return {g["name"]: set(g["names"]) for g in param_groups(model, weight_decay=0.05, **kw)}


def test_param_groups_decay_and_backbone_multiplier():
    model = Toy()
    groups = param_groups(model, weight_decay=0.05, backbone_lr_mult=0.1)
    names = {g["name"]: set(g["names"]) for g in groups}
    assert names["encoder_decay"] == {"backbone.body.patch.weight"}
    assert names["encoder_no_decay"] == {"backbone.body.patch.bias", "backbone.body.norm.weight",
                                         "backbone.body.norm.bias", "backbone.body.pos_embed"}
    assert names["head_decay"] == {"backbone.fpn.weight", "roi_heads.0.weight"}
    assert names["head_no_decay"] == {"backbone.fpn.bias", "roi_heads.0.bias", "roi_heads.1.weight",
                                      "roi_heads.1.bias", "roi_heads.2.weight"}
    by = {g["name"]: g for g in groups}
    assert by["encoder_decay"]["lr_mult"] == 0.1 and by["encoder_no_decay"]["lr_mult"] == 0.1
    assert by["head_decay"]["lr_mult"] == 1.0
    assert by["encoder_no_decay"]["weight_decay"] == 0.0 and by["head_decay"]["weight_decay"] == 0.05
    # frozen parameters are left out; every trainable one is in exactly one group
    all_names = [n for g in groups for n in g["names"]]
    assert len(all_names) == len(set(all_names))
    assert set(all_names) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_build_optimizer_lrs_and_a_step(kind):
    model = Toy()
    train = TrainParams(optimizer=kind, lr=0.01, backbone_lr_mult=0.5, nesterov=True)
    opt = build_optimizer(model, train)
    assert isinstance(opt, torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder_decay"] == pytest.approx(0.005) and lrs["head_decay"] == pytest.approx(0.01)
    before = model.backbone.fpn.weight.detach().clone()
    model.backbone.fpn(torch.randn(2, 8, 4, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.backbone.fpn.weight)


def sched(**kw) -> TrainParams:
    base = dict(lr=1.0, warmup_steps=10, warmup_factor=0.1, min_lr_ratio=0.0)
    return TrainParams(**{**base, **kw})


def test_warmup_in_epochs_equals_the_same_length_in_steps():
    by_steps = sched(scheduler="cosine", warmup_steps=10)
    by_epochs = sched(scheduler="cosine", warmup_steps=3, warmup_epochs=0.5)  # 0.5 x 20 steps per epoch = 10
    for step in (0, 5, 9, 10, 50, 99):
        assert lr_factor(step, 100, by_epochs, steps_per_epoch=20) == pytest.approx(lr_factor(step, 100, by_steps))
    assert lr_factor(5, 100, by_epochs, steps_per_epoch=20) != pytest.approx(lr_factor(5, 100, sched(warmup_steps=3)))
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_factor(5, 100, by_epochs)


def test_linear_warmup_then_constant():
    t = sched(scheduler="constant")
    assert lr_factor(0, 100, t) == pytest.approx(0.1)
    assert lr_factor(5, 100, t) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 100, t) == 1.0 and lr_factor(99, 100, t) == 1.0


def test_cosine_with_floor():
    t = sched(scheduler="cosine", min_lr_ratio=0.01)
    assert lr_factor(10, 110, t) == pytest.approx(1.0)
    assert lr_factor(60, 110, t) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, 110, t) == pytest.approx(0.01)
    assert lr_factor(3, 110, t) < lr_factor(4, 110, t)  # warmup rising


def test_multistep_and_step():
    t = sched(scheduler="multistep", milestones=[0.5, 0.8], gamma=0.1, warmup_steps=0)
    assert [lr_factor(s, 100, t) for s in (0, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    t = sched(scheduler="step", step_size=30, gamma=0.5, warmup_steps=0)
    assert [lr_factor(s, 100, t) for s in (0, 29, 30, 60, 90)] == pytest.approx([1, 1, 0.5, 0.25, 0.125])


def test_onecycle_rises_then_falls():
    t = sched(scheduler="onecycle", warmup_steps=0, min_lr_ratio=0.0)
    values = [lr_factor(s, 100, t) for s in range(101)]
    peak = max(range(101), key=values.__getitem__)
    assert peak == 30 and values[30] == pytest.approx(1.0)
    assert values[0] == pytest.approx(0.1) and values[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_restarts_cycles():
    t = sched(scheduler="cosine_restarts", restart_steps=20, warmup_steps=0)
    assert lr_factor(0, 100, t) == 1.0 and lr_factor(20, 100, t) == 1.0 and lr_factor(40, 100, t) == 1.0
    assert lr_factor(10, 100, t) == pytest.approx(0.5)
    assert lr_factor(19, 100, t) < 0.01


def test_plateau_decays_after_patience_and_survives_state_dict():
    model = Toy()
    t = dataclasses.replace(sched(scheduler="plateau", plateau_patience=1, gamma=0.5, warmup_steps=0), lr=0.1)
    opt = build_optimizer(model, t)
    s = Schedule(opt, t, total_steps=100)
    s.observe(0.3)
    s.observe(0.2)           # one without gain: within patience
    assert s.lr == pytest.approx(0.1)
    s.observe(0.25)          # second without gain: decay
    assert s.lr == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * opt.param_groups[0]["lr_mult"])
    s2 = Schedule(build_optimizer(Toy(), t), t, total_steps=100)
    s2.load_state_dict(s.state_dict())
    assert s2.lr == pytest.approx(0.05)


def test_schedule_sets_group_lrs_per_step():
    model = Toy()
    t = TrainParams(lr=0.02, backbone_lr_mult=0.1, warmup_steps=4, warmup_factor=0.25, scheduler="cosine",
                    min_lr_ratio=0.0)
    opt = build_optimizer(model, t)
    s = Schedule(opt, t, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        s.step()
    assert seen[0]["head_decay"] == pytest.approx(0.02 * 0.25)
    assert seen[4]["head_decay"] == pytest.approx(0.02)
    assert seen[4]["encoder_decay"] == pytest.approx(0.002)
    assert seen[12]["head_decay"] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 0.5)))
