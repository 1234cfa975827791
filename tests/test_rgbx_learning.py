"""Fusion works: on the synthetic thermal data, RGB+X tells the warm/cold twins apart, RGB alone cannot.

The real stage scripts (prepare_data, build_index, train, evaluate) run in temporary projects through
bench/bench_rgbx_learning.py's helpers, which also give BENCHMARKS.md's larger figures. Same data, index, seed
and steps for both models; the RGB model reads the same index (model.modality rgb ignores the aux image).
"""
from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rgbx_learning", ROOT / "bench" / "bench_rgbx_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rgbx_beats_rgb_on_the_classes_only_thermal_tells_apart(tmp_path):
    bench = _bench()
    # 150 steps; 2 threads and no loader process: the suite runs one test at a time
    settings = bench.argparse.Namespace(train_images=200, val_images=60, epochs=6, threads=2)
    base = {**bench.base_overrides(settings), "train.num_workers": 0, "data.synthetic.min_side": 96,
            "data.synthetic.max_side": 128,
            "model.min_size": 112, "model.max_size": 160, "train.warmup_steps": 20}
    data = tmp_path / "data_project"
    data.mkdir()
    bench.write_params(data / "params.yaml", base)
    bench.run_stage(data, "prepare_data")
    bench.run_stage(data, "build_index")
    rgb = bench.one_run(data, tmp_path, "rgb", {**base, "model.modality": "rgb"})
    rgbx = bench.one_run(data, tmp_path, "rgbx", {**base, "model.modality": "rgbx", "model.fusion": "cmx"})
    twins = [c for c in rgbx["per_class_AP"] if c.endswith(bench.TWIN_SUFFIXES)]
    assert len(twins) == 6 and set(rgb["per_class_AP"]) == set(rgbx["per_class_AP"])
    # both learned the classes RGB shows (so the comparison is not between two untrained models) ...
    assert rgb["other_AP"] > 0.05 and rgbx["other_AP"] > 0.05
    # ... and only the model that sees the thermal image separates the twins
    assert rgbx["twin_AP"] > 1.5 * rgb["twin_AP"], (rgb, rgbx)
