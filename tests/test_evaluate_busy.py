"""A busy machine must not inflate eval.json's latency unnoticed: the load average, and the share of its core the
1-thread speed measurement actually got (which sees a competitor at once, where the 1-minute average lags)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import time

import pytest
import torch

from mitdet.engine import evaluate


@pytest.fixture
def quiet_machine(monkeypatch):
    monkeypatch.setattr(evaluate, "machine_info",
                        lambda device: {"threads": 1, "usable_cores": 2, "load_average": [0.3, 0.3, 0.3]})


def test_a_starved_measurement_is_busy_though_the_load_average_is_low(quiet_machine, caplog):
    with caplog.at_level(logging.WARNING, logger="mitdet"):
        info = evaluate.machine_with_load_warning(torch.device("cpu"), share=0.45)
    assert info["busy"] is True and info["speed_cpu_share"] == 0.45
    assert "had 45% of its core" in caplog.text and "inflated" in caplog.text


def test_a_measurement_that_had_its_core_is_not_busy(quiet_machine, caplog):
    with caplog.at_level(logging.WARNING, logger="mitdet"):
        info = evaluate.machine_with_load_warning(torch.device("cpu"), share=0.97)
        no_share = evaluate.machine_with_load_warning(torch.device("cpu"))  # a GPU, or no speed measured
    assert info["busy"] is False and info["speed_cpu_share"] == 0.97
    assert no_share["busy"] is False and no_share["speed_cpu_share"] is None
    assert "busy" not in caplog.text


def test_a_high_load_average_is_busy(monkeypatch):
    monkeypatch.setattr(evaluate, "machine_info",
                        lambda device: {"threads": 1, "usable_cores": 2, "load_average": [5.0, 5.0, 5.0]})
    assert evaluate.machine_with_load_warning(torch.device("cpu"), share=1.0)["busy"] is True


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_cpu_share_sees_a_competitor_on_the_same_core():
    """This process and a spinning child pinned to one core: the work loop gets about half of it."""
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    child = multiprocessing.get_context("fork").Process(target=_spin, args=(4.0,))
    try:
        child.start()  # inherits the one-core affinity
        time.sleep(0.2)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        _spin(1.0)
        share = evaluate.cpu_share(time.process_time() - cpu0, time.perf_counter() - wall0, 1)
    finally:
        child.terminate()
        child.join()
        os.sched_setaffinity(0, before)
    assert share is not None and share < evaluate.MIN_CPU_SHARE, share
    assert evaluate.cpu_share(1.0, 0.0, 1) is None and evaluate.cpu_share(1.0, 2.0, 2) == 0.25
