"""Stopping a run cleanly: SIGINT/SIGTERM finish the current step and save, one trainer per folder."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path

from mitdet.errors import TrainingError

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM or a hook) after writing last.pt."""

    def __init__(self, step: int, signum: int | None):
        # DVC sets DVC_EXP_BASELINE_REV for `dvc exp run`: that is the command to repeat
        again = "dvc exp run" if os.environ.get("DVC_EXP_BASELINE_REV") else "dvc repro"
        super().__init__(f"interrupted at step {step}: run `{again}` again to resume")
        self.step, self.signum = step, signum



def until_stopped(batches, stop_flag: "StopFlag"):
    """The batches, ending quietly when loader workers die of the same SIGINT that asked the loop to stop."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception:
            if stop_flag.signum is None:
                raise
            return
        yield item


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step and save; a second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker forked with this handler: the main process stops it
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving last.pt", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def locked(directory: Path, enabled: bool = True):
    """An exclusive lock on the checkpoint folder: a second trainer (e.g. a second `dvc repro`) fails at once."""
    if not enabled:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError("another trainer is running on this folder (its .lock is held)",
                                where=str(directory), fix="wait for it or stop it first") from None
        yield


