"""Quiet windows shared by the stages `make repro` runs side by side: a stage timing its latency asks the others
to pause, so the figure is the model's alone.

`quiet()` is the window; `paused_between(batches)` is how the others take part: they wait at their next batch
while a window is open, and a window opens only once the batches in flight have finished. Both go through two lock
files named by the environment variable MITDET_QUIET_LOCK (`make repro` sets it); without it, or where `fcntl` is
missing, both do nothing. The locks are the kernel's (`flock`): a stage that dies lets go of them.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no windows, nothing waits
    fcntl = None

ENV = "MITDET_QUIET_LOCK"


def _paths() -> tuple[str, str] | None:
    path = os.environ.get(ENV)
    return (path, path + ".busy") if path and fcntl is not None else None


@contextlib.contextmanager
def quiet() -> Iterator[bool]:
    """Hold a quiet window: no stage taking part starts a batch, and none has one in flight; yields whether the
    window is shared with other stages (False: nothing to ask, the environment names no lock)."""
    paths = _paths()
    if paths is None:
        yield False
        return
    with open(paths[0], "a") as gate, open(paths[1], "a") as busy:
        fcntl.flock(gate, fcntl.LOCK_EX)  # no new batch starts elsewhere
        fcntl.flock(busy, fcntl.LOCK_EX)  # the batches elsewhere in flight have finished
        try:
            yield True
        finally:
            fcntl.flock(busy, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


class paused_between:
    """`batches`, handed out one at a time outside any quiet window: each batch, from its loading to the next one,
    counts as in flight; a batch waits to start while a window is open. `len` is the wrapped one's."""

    def __init__(self, batches: Iterable):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        paths = _paths()
        if paths is None:
            yield from self.batches
            return
        it = iter(self.batches)
        with open(paths[0], "a") as gate, open(paths[1], "a") as busy:
            while True:
                fcntl.flock(gate, fcntl.LOCK_SH)  # waits while a window is open
                fcntl.flock(busy, fcntl.LOCK_SH)
                fcntl.flock(gate, fcntl.LOCK_UN)
                try:
                    batch = next(it, _END)
                    if batch is _END:
                        return
                    yield batch
                finally:
                    fcntl.flock(busy, fcntl.LOCK_UN)


_END = object()
