"""Watching a run: non-finite losses, loss spikes, validation that gets worse, early stopping."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from mitdet.errors import TrainingError
from mitdet.params import TrainParams

log = logging.getLogger(__name__)

SPIKE_RATIO = 3.0       # a logged loss above 3x its moving average is reported
EMA_DECAY = 0.9         # moving average over log points
WORSE_IN_A_ROW = 3      # validations getting worse this many times in a row are reported


class NonFiniteLossError(TrainingError):
    """Too many non-finite losses in a row: the run stops, keeping the last good checkpoint."""


@dataclass
class Monitor:
    """State of the run's health checks and of early stopping; `state_dict` travels in the checkpoint."""
    max_nonfinite: int
    monitor: str = "AP50"
    patience: int = 0
    min_delta: float = 0.0
    nonfinite_steps: int = 0        # all skipped steps in the run
    nonfinite_in_a_row: int = 0
    loss_ema: float | None = None
    best: float = -math.inf         # best monitored validation metric
    best_step: int = -1
    best_epoch: int = -1
    bad_validations: int = 0        # validations without a gain of min_delta over `best` (early stopping)
    worse_in_a_row: int = 0
    last_val: float | None = None

    @classmethod
    def from_params(cls, train: TrainParams) -> "Monitor":
        return cls(max_nonfinite=train.max_nonfinite_steps, monitor=train.val.monitor,
                   patience=train.early_stopping.patience, min_delta=train.early_stopping.min_delta)

    def step_ok(self, finite: bool, step: int, checkpoint: str) -> None:
        """Count a skipped (non-finite) step; raise after `max_nonfinite` of them in a row."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning("ALERT non-finite loss at step %d: step skipped (no update), %d in a row, %d in all",
                    step, self.nonfinite_in_a_row, self.nonfinite_steps)
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            kept = (f"the last good checkpoint is kept at {checkpoint}" if os.path.exists(checkpoint)
                    else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"the loss was non-finite {self.nonfinite_in_a_row} optimizer steps in a row (last at step {step}, "
                f"train.max_nonfinite_steps = {self.max_nonfinite}); {kept}",
                fix="lower train.lr, raise train.warmup_steps or set train.clip_grad_norm")

    def loss_logged(self, loss: float, step: int) -> None:
        """Alert on a loss spike against the moving average of logged losses."""
        if not math.isfinite(loss):
            return
        if self.loss_ema is not None and loss > SPIKE_RATIO * self.loss_ema:
            log.warning("ALERT loss spike at step %d: %.4g is more than %.0fx its moving average %.4g",
                        step, loss, SPIKE_RATIO, self.loss_ema)
        self.loss_ema = loss if self.loss_ema is None else EMA_DECAY * self.loss_ema + (1 - EMA_DECAY) * loss

    def validated(self, value: float, step: int, epoch: int) -> tuple[bool, bool]:
        """Record a validation result; return (is_best, stop_early)."""
        if self.last_val is not None and value < self.last_val:
            self.worse_in_a_row += 1
            if self.worse_in_a_row >= WORSE_IN_A_ROW:
                log.warning("ALERT validation %s got worse %d times in a row (now %.4f)",
                            self.monitor, self.worse_in_a_row, value)
        else:
            self.worse_in_a_row = 0
        self.last_val = value
        is_best = value > self.best
        if value > self.best + self.min_delta or self.best == -math.inf:
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        if is_best:
            self.best, self.best_step, self.best_epoch = value, step, epoch
        stop = self.patience > 0 and self.bad_validations >= self.patience
        if stop:
            log.info("early stopping: %s did not gain %.4g for %d validations (best %.4f at step %d)",
                     self.monitor, self.min_delta, self.bad_validations, self.best, self.best_step)
        return is_best, stop

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "nonfinite_steps", "nonfinite_in_a_row", "loss_ema", "best", "best_step", "best_epoch",
            "bad_validations", "worse_in_a_row", "last_val")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
