"""Quiet windows across processes (mitdet.engine.quiet): while one stage holds a window, another taking part runs
no batch, before and after it does; without the lock variable nothing waits."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from mitdet.engine.quiet import ENV, paused_between, quiet

WORKER = """
import json, sys, time
from mitdet.engine.quiet import paused_between
log = open(sys.argv[1], "a")
for i in paused_between(range(60)):
    start = time.monotonic()
    while time.monotonic() - start < 0.02:  # a batch's work
        pass
    log.write(json.dumps([start, time.monotonic()]) + "\\n")
    log.flush()
"""


def _batches(path) -> list[list[float]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_no_batch_runs_inside_a_quiet_window(tmp_path, monkeypatch):
    lock = tmp_path / "quiet.lock"
    monkeypatch.setenv(ENV, str(lock))
    log = tmp_path / "batches.jsonl"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(log)])
    try:
        deadline = time.monotonic() + 60
        while len(_batches(log)) < 3 and time.monotonic() < deadline:  # the worker is well under way
            time.sleep(0.01)
        with quiet() as shared:
            opened = time.monotonic()
            time.sleep(0.3)
            closed = time.monotonic()
        assert worker.wait(timeout=120) == 0
    finally:
        worker.kill()
    assert shared is True
    batches = _batches(log)
    assert len(batches) == 60
    assert not [b for b in batches if b[0] < closed and b[1] > opened]  # none overlaps the window
    assert any(b[1] <= opened for b in batches) and any(b[0] >= closed for b in batches)


def test_without_the_variable_nothing_waits(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with quiet() as shared:
        assert shared is False
    batches = paused_between([1, 2, 3])
    assert len(batches) == 3 and list(batches) == [1, 2, 3]


def test_a_stopped_iteration_lets_a_window_open(tmp_path, monkeypatch):
    """A consumer that leaves the loop early (an error in a batch) must not keep the others' windows shut."""
    monkeypatch.setenv(ENV, str(tmp_path / "quiet.lock"))
    for item in paused_between(range(10)):
        if item == 2:
            break
    code = subprocess.run([sys.executable, "-c", "from mitdet.engine.quiet import quiet\nwith quiet(): pass\n"],
                          timeout=60).returncode
    assert code == 0
