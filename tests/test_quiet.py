"""Quiet windows across processes (mitdet.engine.quiet): while one stage holds a window, another taking part does
no work, neither a batch nor what lies between pause points; without the lock variable nothing waits."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from mitdet.engine.quiet import ENV, paused_between, quiet

WORKER = """
import json, pathlib, sys, time
from mitdet.engine import quiet
log = open(sys.argv[1], "a")
def work(seconds, what):
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        pass
    log.write(json.dumps([what, start, time.monotonic()]) + "\\n")
    log.flush()
quiet.take_part()
for i in quiet.paused_between(range(30)):
    work(0.02, "batch")
    if i == 5:  # a long stretch without a pause point (a model load, a GFLOPs count)
        pathlib.Path(sys.argv[2]).touch()
        work(0.5, "stretch")
"""


def _work(path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_window_waits_for_the_others_and_holds_them(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "quiet.lock"))
    log, stretch = tmp_path / "work.jsonl", tmp_path / "stretch"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(log), str(stretch)])
    try:
        deadline = time.monotonic() + 60
        while not stretch.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        asked = time.monotonic()
        with quiet() as shared:  # asked in the middle of the stretch: opens once it is over
            opened = time.monotonic()
            time.sleep(0.3)
            closed = time.monotonic()
        assert worker.wait(timeout=120) == 0
    finally:
        worker.kill()
    assert shared is True
    work = _work(log)
    assert len(work) == 31
    assert not [w for w in work if w[1] < closed and w[2] > opened]  # nothing overlaps the window
    (_, _, stretch_end), = [w for w in work if w[0] == "stretch"]
    assert asked < stretch_end <= opened  # the window waited for the stretch to end
    assert any(w[1] >= closed for w in work)  # and the worker went on after it


def test_without_the_variable_nothing_waits(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with quiet() as shared:
        assert shared is False
    batches = paused_between([1, 2, 3])
    assert len(batches) == 3 and list(batches) == [1, 2, 3]


def test_a_stage_that_fails_lets_the_windows_open(tmp_path, monkeypatch):
    """A stage taking part that dies in the middle of its batches must not keep the others' windows shut."""
    monkeypatch.setenv(ENV, str(tmp_path / "quiet.lock"))
    failing = ("from mitdet.engine import quiet\nquiet.take_part()\n"
               "for i in quiet.paused_between(range(10)):\n    if i == 2: raise SystemExit(3)\n")
    assert subprocess.run([sys.executable, "-c", failing], timeout=60).returncode == 3
    code = subprocess.run([sys.executable, "-c", "from mitdet.engine.quiet import quiet\nwith quiet(): pass\n"],
                          timeout=60).returncode
    assert code == 0
