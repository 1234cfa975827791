"""Parameter groups, optimizers and learning-rate schedules (stepped once per optimizer step)."""
from __future__ import annotations

import math

import torch
from torch import nn

from mitdet.errors import ParamsError
from mitdet.params import TrainParams

# Parameters whose name holds one of these get no weight decay (position tables, embeddings, tokens).
NO_DECAY_NAME_PARTS = ("pos_embed", "position", "embedding", "cls_token", "rel_pos")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Embedding)


def is_encoder_param(name: str) -> bool:
    """True for the MiT encoder inside torchvision's BackboneWithFPN (`backbone.body.*`), not the FPN."""
    return name.startswith("backbone.") and not name.startswith("backbone.fpn.")


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters in up to four groups: (encoder | rest) x (decay | no decay).

    No decay on biases, 1-D tensors, norm/embedding modules and position parameters. Each group carries
    `lr_mult` (backbone_lr_mult for the encoder, 1 otherwise), which the schedule multiplies in.
    """
    no_decay_ids = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, NORM_TYPES) or p.ndim <= 1 or pname == "bias" \
                    or any(part in full for part in NO_DECAY_NAME_PARTS):
                no_decay_ids.add(id(p))
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        encoder, decay = is_encoder_param(name), id(p) not in no_decay_ids
        group = groups.setdefault((encoder, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_mult": backbone_lr_mult if encoder else 1.0,
            "name": f"{'encoder' if encoder else 'head'}_{'decay' if decay else 'no_decay'}",
        })
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], not k[1]))]


def build_optimizer(model: nn.Module, train: TrainParams) -> torch.optim.Optimizer:
    """AdamW or SGD over `param_groups`, fused kernels when every parameter lives on CUDA."""
    groups = param_groups(model, train.weight_decay, train.backbone_lr_mult)
    if not groups:
        raise ParamsError("the model has no trainable parameters", where="model.frozen_stages",
                          fix="freeze fewer stages")
    for g in groups:
        g["lr"] = train.lr * g["lr_mult"]
        g["initial_lr"] = g["lr"]
        del g["names"]  # not stored in optimizer state: names are for inspection only
    fused = all(p.is_cuda for g in groups for p in g["params"])
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                                 fused=fused or None)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov and train.momentum > 0,
                           weight_decay=train.weight_decay, fused=fused or None)


def warmup_steps(train: TrainParams, steps_per_epoch: int = 0) -> int:
    """Length of the linear warmup in optimizer steps: `train.warmup_epochs` when > 0, else `train.warmup_steps`."""
    if train.warmup_epochs > 0:
        if steps_per_epoch < 1:
            raise ValueError("train.warmup_epochs needs the number of steps per epoch")
        return max(1, round(train.warmup_epochs * steps_per_epoch))
    return train.warmup_steps


def lr_factor(step: int, total_steps: int, train: TrainParams, plateau_scale: float = 1.0,
              steps_per_epoch: int = 0) -> float:
    """The factor on `train.lr` for the optimizer step about to be taken (`step` steps done so far)."""
    total = max(1, total_steps)
    warm = min(warmup_steps(train, steps_per_epoch), total)
    floor = train.min_lr_ratio
    kind = train.scheduler
    if kind == "onecycle":  # its own cosine rise (warmup_steps, or 30% of the run) then cosine down to the floor
        rise = warm if warm > 0 else max(1, int(0.3 * total))
        if step < rise:
            return train.warmup_factor + (1 - train.warmup_factor) * 0.5 * (1 - math.cos(math.pi * step / rise))
        t = min(1.0, (step - rise) / max(1, total - rise))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "constant":
        f = 1.0
    elif kind == "cosine":
        t = min(1.0, max(0, step - warm) / max(1, total - warm))
        f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "cosine_restarts":
        t = (max(0, step - warm) % train.restart_steps) / train.restart_steps
        f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "multistep":
        f = train.gamma ** sum(step >= int(m * total) for m in train.milestones)
    elif kind == "step":
        f = train.gamma ** (step // train.step_size)
    elif kind == "plateau":
        f = plateau_scale
    else:
        raise ValueError(f"train.scheduler: unknown schedule {kind!r}")
    if step < warm:  # linear warmup from warmup_factor to 1, multiplied into the schedule
        f *= train.warmup_factor + (1 - train.warmup_factor) * step / warm
    return f


class Schedule:
    """Sets each group's lr = initial_lr * lr_factor(step); `observe(metric)` feeds the plateau schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainParams, total_steps: int,
                 steps_per_epoch: int = 0):
        self.optimizer, self.train, self.total_steps = optimizer, train, total_steps
        self.steps_per_epoch = steps_per_epoch
        self.step_count = 0
        self.plateau_scale, self.plateau_best, self.plateau_bad = 1.0, -math.inf, 0
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.step_count, self.total_steps, self.train, self.plateau_scale, self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def observe(self, metric: float) -> None:
        """A validation result (higher is better): decay by `gamma` after `plateau_patience` without gain."""
        if self.train.scheduler != "plateau":
            return
        if metric > self.plateau_best:
            self.plateau_best, self.plateau_bad = metric, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.train.plateau_patience:
                self.plateau_scale *= self.train.gamma
                self.plateau_bad = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The base lr now (the head's, without backbone multiplier)."""
        return self.train.lr * lr_factor(self.step_count, self.total_steps, self.train, self.plateau_scale,
                                         self.steps_per_epoch)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self._apply()
