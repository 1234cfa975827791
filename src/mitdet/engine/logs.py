"""What a run tells while it trains: CSV histories (for dvc plots), TensorBoard, the progress bar, log lines."""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

from mitdet.io import csv_text, write_text

BATCH_COLUMNS = ["epoch", "step", "loss", "loss_classifier", "loss_box_reg", "loss_objectness",
                 "loss_rpn_box_reg", "lr", "images_per_s", "timestamp"]
EPOCH_COLUMNS = ["epoch", "avg_loss", "epoch_seconds", "lr", "val_AP", "val_AP50", "is_best", "checkpoint",
                 "timestamp"]
VAL_COLUMNS = ["step", "epoch", "AP", "AP50", "AP75"]
LOSS_KEYS = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]


class CsvLog:
    """A CSV history written live: each row is appended to the file when it is made (one `write` of an
    O_APPEND file, so readers such as `dvc plots show` or `mitdet monitor` see the run as it goes).

    `rows` travel in the checkpoint; `flush` rewrites the whole file from them (temp file + rename), which a
    resumed run does first: rows written after its checkpoint are replaced, with no duplicates and no gaps.
    """

    def __init__(self, path: str | None, columns: list[str], rows: list[dict] | None = None):
        self.path, self.columns = path, columns
        self.rows: list[dict] = [dict(r) for r in rows or []]

    def append(self, row: dict) -> None:
        self.rows.append({c: row.get(c, "") for c in self.columns})
        if self.path is not None:  # rank 0 only
            line = csv_text(self.columns, [[self.rows[-1].get(c) for c in self.columns]]).split("\n", 1)[1]
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)

    def flush(self) -> None:
        if self.path is None:  # not rank 0
            return
        write_text(self.path, csv_text(self.columns, ([r.get(c) for c in self.columns] for r in self.rows)))


class Histories:
    """The run's three CSV histories (batches, epochs, validations); their rows travel in last.pt."""

    def __init__(self, out, main: bool):
        self.batches = CsvLog(out.train_batches_csv if main else None, BATCH_COLUMNS)
        self.epochs = CsvLog(out.train_epochs_csv if main else None, EPOCH_COLUMNS)
        self.val = CsvLog(out.val_history_csv if main else None, VAL_COLUMNS)

    def flush(self) -> None:
        for log in (self.batches, self.epochs, self.val):
            log.flush()

    def state_dict(self) -> dict:
        return {"batches": self.batches.rows, "epochs": self.epochs.rows, "val": self.val.rows}

    def load_state_dict(self, state: dict) -> None:
        for name in ("batches", "epochs", "val"):
            getattr(self, name).rows = [dict(r) for r in state[name]]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """One handler on the `mitdet` logger that cooperates with tqdm (idempotent)."""
    logger = logging.getLogger("mitdet")
    logger.setLevel(level)
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Steps done / total with ETA; the loop sets the postfix (loss averages, lr, images/s)."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                file=sys.stderr, mininterval=1.0, desc="train")


class TensorBoard:
    """Optional scalars under models/<b>/tensorboard/; a no-op when off or not rank 0."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
