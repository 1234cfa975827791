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
    """SIGINT/SIGTERM ask the loop to finish the current step and save; a second signal stops at once.

    Under DVC (DVC_STAGE set) the parent going away counts as SIGTERM: DVC passes on SIGINT only, so a SIGTERM
    to `dvc repro` would otherwise leave the stage training on, orphaned, beside the next `dvc repro`.
    """

    PARENT_POLL_S = 1.0

    def __init__(self, watch_parent: bool | None = None):
        self.signum: int | None = None
        self._old = {}
        self._watch = bool(os.environ.get("DVC_STAGE")) if watch_parent is None else watch_parent
        self._done = threading.Event()

    def __enter__(self):
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        if self._watch:
            threading.Thread(target=self._watch_parent, args=(os.getppid(),), daemon=True).start()
        return self

    def _watch_parent(self, parent: int) -> None:
        while not self._done.wait(self.PARENT_POLL_S):
            if os.getppid() != parent and self.signum is None:
                self.signum = signal.SIGTERM
                log.warning("the parent process (%d) is gone: finishing the current step, then saving last.pt",
                            parent)
                return

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker forked with this handler: the main process stops it
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving last.pt", signal.Signals(signum).name)

    def __exit__(self, *exc):
        self._done.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def locked(directory: Path, enabled: bool = True, name: str = ".lock", who: str = "trainer"):
    """An exclusive lock file in `directory`: a second trainer (or evaluation) of the same backbone, e.g. from a
    second `dvc repro` beside an orphaned one, fails at once instead of writing the same files."""
    if not enabled:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"another {who} is running on this folder (its {name} is held)",
                                where=str(directory), fix="wait for it or stop it first") from None
        yield


