"""What a training run is (`Plan`) and what it changes (`RunState`, whose `state_dict` is the schema of last.pt)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mitdet.engine import checkpoint as ckpt
from mitdet.engine import distributed
from mitdet.engine.logs import LOSS_KEYS, Histories
from mitdet.engine.monitor import Monitor
from mitdet.engine.optim import Schedule
from mitdet.errors import ParamsError
from mitdet.params import TrainParams


@dataclass(frozen=True)
class Plan:
    """How long the run is: batches per epoch, gradient accumulation, optimizer steps in all."""
    batches_per_epoch: int
    accum: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.accum

    @property
    def batches_used(self) -> int:  # trailing batches that do not fill an accumulation are left out
        return self.steps_per_epoch * self.accum

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def make_plan(train: TrainParams, batches_per_epoch: int) -> Plan:
    accum = train.grad_accum
    if batches_per_epoch // accum < 1:
        raise ParamsError(f"{accum} exceeds the {batches_per_epoch} batches of an epoch (batch_size "
                          f"{train.batch_size})", where="train.grad_accum",
                          fix="lower train.grad_accum or train.batch_size")
    steps_per_epoch = batches_per_epoch // accum
    total = train.max_steps if train.max_steps > 0 else train.epochs * steps_per_epoch
    return Plan(batches_per_epoch, accum, total)



class LossSums:
    """Loss sums on the device (read back only at log rows and epoch ends: no per-step host sync)."""
    WINDOW = ("loss", *LOSS_KEYS, "images", "steps")  # since the last log row; steps: finite steps

    def __init__(self, device: torch.device):
        self.device = device
        self.window = torch.zeros(len(self.WINDOW), device=device)
        self.epoch = torch.zeros(2, device=device)  # the epoch's loss sum and finite steps

    def add_step(self, step_loss: torch.Tensor) -> None:
        """A finite optimizer step's loss and its four components."""
        self.window[:5] += step_loss
        self.window[6] += 1
        self.epoch[0] += step_loss[0]
        self.epoch[1] += 1

    def reduce_window(self) -> dict[str, float]:
        """The window's sums over all ranks; the window starts again."""
        sums = distributed.all_reduce_sum(self.window.clone()).tolist()
        self.window.zero_()
        return dict(zip(self.WINDOW, sums, strict=True))

    def reduce_epoch(self) -> float | None:
        """The epoch's average loss over all ranks (None without a finite step); the epoch starts again."""
        loss_sum, steps = distributed.all_reduce_sum(self.epoch.clone()).tolist()
        self.epoch.zero_()
        return loss_sum / steps if steps else None

    def state_dict(self) -> dict:
        return {"window": self.window.cpu(), "epoch": self.epoch.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.epoch = state["window"].to(self.device), state["epoch"].to(self.device)


@dataclass
class RunState:
    """Everything the loop changes; `state_dict()` is the schema of last.pt (with each rank's RNG and sums)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    monitor: Monitor
    histories: Histories
    sums: LossSums
    step: int = 0
    epoch: int = 0              # the epoch in progress (0-based); rows and checkpoints say epoch + 1
    batch_in_epoch: int = 0     # batches of `epoch` consumed by the last optimizer step
    seconds: float = 0.0        # training time of earlier sessions
    images_seen: int = 0
    images_skipped: int = 0
    epoch_seconds: float = 0.0
    last_val_step: int = -1
    early_stopped: bool = False
    resumed_from_step: int = 0
    finished: bool = False
    result: dict = field(default_factory=dict)
    # this session's clocks: not saved
    session_start: float = field(default_factory=time.perf_counter)
    session_first_step: int = 0
    epoch_start: float = 0.0
    log_start: float = 0.0

    COUNTERS = ("step", "epoch", "batch_in_epoch", "images_seen", "images_skipped", "epoch_seconds",
                "last_val_step", "early_stopped", "resumed_from_step", "finished", "result")

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self.session_start)

    def clock_epoch(self) -> None:
        """Add the time since the last mark to the epoch's seconds (before a save, at the epoch's end)."""
        t = time.perf_counter()
        self.epoch_seconds, self.epoch_start = self.epoch_seconds + t - self.epoch_start, t

    def rank_state(self) -> dict:
        """What differs between ranks: the RNG streams and the unlogged loss sums."""
        return {"rng": ckpt.rng_state(), "sums": self.sums.state_dict()}

    def state_dict(self, fingerprint: dict, ranks: list[dict]) -> dict:
        return {
            "fingerprint": fingerprint, "ranks": ranks, "seconds": self.elapsed(),
            **{k: getattr(self, k) for k in self.COUNTERS},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "monitor": self.monitor.state_dict(), "histories": self.histories.state_dict(),
        }

    def load_state_dict(self, state: dict, rank: int) -> None:
        """Restore a saved run (RNG streams excepted: they are set where training begins)."""
        for k in self.COUNTERS:
            setattr(self, k, state[k])
        self.seconds = state["seconds"]
        self.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:  # None in a stored finished run (nothing left to train)
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.monitor.load_state_dict(state["monitor"])
        self.histories.load_state_dict(state["histories"])
        if state["ranks"]:  # a stored finished run has none: nothing is left to train
            self.sums.load_state_dict(state["ranks"][rank]["sums"])
        if not state["finished"]:
            self.resumed_from_step = state["step"]


