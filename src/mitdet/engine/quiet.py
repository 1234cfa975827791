"""Quiet windows shared by the stages `make repro` runs side by side: a stage timing its latency asks the others
to pause, so the figure is the model's alone.

A stage takes part with `take_part()`: from then on it counts as busy, except while it waits at a pause point
(`pause_point()`, which `paused_between` calls between batches). `quiet()` opens a window: it waits until every
other stage taking part is at a pause point (or done), and holds them there until it closes. So a window never
overlaps another stage's model loading, scoring or GFLOPs count, only its waiting.

Two lock files named by the environment variable MITDET_QUIET_LOCK (`make repro` sets it) carry this: a gate
(exclusive while a window is open) and a busy lock (shared by the stages at work). Without the variable, or where
`fcntl` is missing, nothing waits. The locks are the kernel's (`flock`): a stage that dies lets go of them.
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
_part: tuple | None = None  # (gate, busy) files while this process takes part


def _paths() -> tuple[str, str] | None:
    path = os.environ.get(ENV)
    return (path, path + ".busy") if path and fcntl is not None else None


def _enter(gate, busy) -> None:
    """Wait while a window is open, then count as busy."""
    fcntl.flock(gate, fcntl.LOCK_SH)
    fcntl.flock(busy, fcntl.LOCK_SH)
    fcntl.flock(gate, fcntl.LOCK_UN)


def take_part() -> bool:
    """Count this process as busy from now on (first waiting for an open window to close); whether it takes part."""
    global _part
    paths = _paths()
    if paths is None or _part is not None:
        return _part is not None
    _part = (open(paths[0], "a"), open(paths[1], "a"))
    _enter(*_part)
    return True


def pause_point() -> None:
    """Stop counting as busy for a moment: a window waiting for this process opens now, and this waits it out."""
    if _part is not None:
        fcntl.flock(_part[1], fcntl.LOCK_UN)
        _enter(*_part)


@contextlib.contextmanager
def quiet() -> Iterator[bool]:
    """Hold a quiet window: every other process taking part waits at a pause point meanwhile; yields whether there
    are others to ask (False: the environment names no lock)."""
    paths = _paths()
    if paths is None:
        yield False
        return
    if _part is not None:  # not busy while measuring: a window must not wait for its own process
        fcntl.flock(_part[1], fcntl.LOCK_UN)
    try:
        with open(paths[0], "a") as gate, open(paths[1], "a") as busy:
            fcntl.flock(gate, fcntl.LOCK_EX)  # no one leaves a pause point
            fcntl.flock(busy, fcntl.LOCK_EX)  # every one else is at one (or done)
            try:
                yield True
            finally:
                fcntl.flock(busy, fcntl.LOCK_UN)
                fcntl.flock(gate, fcntl.LOCK_UN)
    finally:
        if _part is not None:
            _enter(*_part)


class paused_between:
    """`batches` with a pause point before each one (`len` is the wrapped one's)."""

    def __init__(self, batches: Iterable):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        it = iter(self.batches)
        while True:
            pause_point()
            batch = next(it, _END)
            if batch is _END:
                return
            yield batch


_END = object()
