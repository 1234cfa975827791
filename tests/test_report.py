"""The cross-backbone report, from hand-written metrics files: best backbone, Pareto set, missing ones, plots."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from mitdet.io import read_json, write_json
from mitdet.params import ReportParams
from mitdet.paths import REPORT_JSON, REPORT_MD, REPORT_PLOTS, BackbonePaths
from mitdet.report import build_report, pareto_set

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_backbone(root, b, ap, ms, params_m, train=True, per_class=None):
    p = BackbonePaths(b)
    write_json(root / p.eval_metrics, {
        "AP": ap, "AP50": ap + 0.2, "AP75": ap * 0.8, "APs": None, "APm": ap, "APl": ap, "AR1": 0.1, "AR10": 0.2,
        "AR100": 0.3, "top10_mAP": ap, "bottom10_mAP": ap, "ap_spread": 0.0, "images_per_s": 1000.0 / ms,
        "ms_per_image": ms, "params_m": params_m, "gflops": params_m * 2, "num_images": 10})
    if train:
        write_json(root / p.train_metrics, {"seconds": 600.0, "best_epoch": 3, "images_per_s": 4.0,
                                            "params": int(params_m * 1e6)})
    write_json(root / p.per_class_metrics, per_class or {
        "circle": {"AP": ap, "AP50": ap, "AP75": ap, "recall": 0.5, "num_preds": 5, "num_gt": 4},
        "square": {"AP": ap / 2, "AP50": ap, "AP75": 0.0, "recall": 0.2, "num_preds": 3, "num_gt": 9},
        "ghost": {"AP": None, "AP50": None, "AP75": None, "recall": None, "num_preds": 1, "num_gt": 0}})


@pytest.fixture
def project(tmp_path):
    # b0 fast and weak, b1 slower and better, b2 slowest but worse than b1 (dominated); b3 listed, never run
    write_backbone(tmp_path, "mit_b0", ap=0.20, ms=10.0, params_m=20.0)
    write_backbone(tmp_path, "mit_b1", ap=0.30, ms=20.0, params_m=30.0, train=False)
    write_backbone(tmp_path, "mit_b2", ap=0.25, ms=40.0, params_m=45.0)
    write_backbone(tmp_path, "mit_b5", ap=0.90, ms=5.0, params_m=80.0)  # not in params.backbones: ignored
    return tmp_path


def test_report_ranks_marks_pareto_and_missing(project):
    out = build_report(["mit_b0", "mit_b1", "mit_b2", "mit_b3"], ReportParams(metric="AP"), root=project)
    assert out["best_backbone"] == "mit_b1"
    assert out["pareto"] == ["mit_b0", "mit_b1"]
    assert out["missing"] == ["mit_b3", "mit_b4", "mit_b5"]
    report = read_json(project / REPORT_JSON)
    assert report == out
    b3 = report["backbones"]["mit_b3"]
    assert b3["status"] == "missing" and b3["AP"] is None and b3["params_m"] is None
    assert "evaluate_mit_b3" in b3["reason"]
    assert report["backbones"]["mit_b5"]["reason"] == "not in params.backbones"
    b0 = report["backbones"]["mit_b0"]
    assert b0["train_minutes"] == pytest.approx(10.0) and b0["best_epoch"] == 3 and b0["pareto"] is True
    b1 = report["backbones"]["mit_b1"]  # evaluated, never trained here: its training figures are null, not zero
    assert b1["status"] == "ok" and b1["train_minutes"] is None and b1["best_epoch"] is None
    assert report["backbones"]["mit_b2"]["pareto"] is False


def test_report_by_another_metric(project):
    out = build_report(["mit_b0", "mit_b1", "mit_b2"], ReportParams(metric="AP75"), root=project)
    assert out["best_backbone"] == "mit_b1" and out["metric"] == "AP75"


def test_markdown_table(project):
    build_report(["mit_b0", "mit_b1", "mit_b2", "mit_b3"], ReportParams(), root=project)
    md = (project / REPORT_MD).read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| backbone"))
    assert "AP50" in header and "ms/image" in header and "params (M)" in header
    rows = {line.split("|")[1].strip().strip("*"): line for line in lines if line.startswith("| ") and "mit_b" in line}
    assert set(rows) == {f"mit_b{i}" for i in range(6)}
    assert "missing" in rows["mit_b3"] and "0.000" not in rows["mit_b3"]
    assert "**0.300**" in rows["mit_b1"]  # the best is in bold
    assert "Best by AP: **mit_b1**" in md and "mit_b0, mit_b1" in md
    n_cols = header.count("|")
    assert all(line.count("|") == n_cols for line in rows.values())


def test_plots_written(project):
    build_report(["mit_b0", "mit_b1", "mit_b2", "mit_b3"], ReportParams(heatmap_max_classes=1), root=project)
    plots = project / REPORT_PLOTS
    for name in ("ap_vs_params.png", "ap_vs_latency.png", "per_class_heatmap.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC, name
    with open(plots / "ap_vs_latency.csv") as f:
        latency = {r["backbone"]: r for r in csv.DictReader(f)}
    assert set(latency) == {"mit_b0", "mit_b1", "mit_b2"}  # no row for a missing backbone
    assert [latency[b]["pareto"] for b in ("mit_b0", "mit_b1", "mit_b2")] == ["1", "1", "0"]
    assert float(latency["mit_b1"]["ms_per_image"]) == 20.0
    with open(plots / "per_class_ap.csv") as f:
        per_class = list(csv.DictReader(f))
    assert {(r["class"], r["backbone"]) for r in per_class} == {
        (c, b) for c in ("circle", "square") for b in ("mit_b0", "mit_b1", "mit_b2")}  # ghost has no GT: no row
    with open(plots / "ap_vs_params.csv") as f:
        assert {r["backbone"]: r["pareto"] for r in csv.DictReader(f)} == {"mit_b0": "1", "mit_b1": "1", "mit_b2": "0"}


def test_nothing_evaluated_yet_reports_all_missing(tmp_path):
    out = build_report(["mit_b0"], ReportParams(), root=tmp_path)
    assert out["best_backbone"] is None and out["pareto"] == [] and len(out["missing"]) == 6
    assert (tmp_path / REPORT_PLOTS / "ap_vs_latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "No backbone has an AP yet" in (tmp_path / REPORT_MD).read_text()


def test_pareto_set_rules():
    pts = {"a": (1.0, 0.1), "b": (2.0, 0.3), "c": (2.0, 0.2), "d": (3.0, 0.3), "e": (None, 0.9)}
    assert pareto_set(pts) == ["a", "b"]  # c: same cost, lower AP; d: same AP, higher cost; e: no cost


def test_heatmap_scale_is_fixed_at_0_to_1(project):
    from mitdet.report import ap_by_class_and_backbone, collect, heatmap_figure

    write_backbone(project, "mit_b0", ap=0.0025, ms=10.0, params_m=20.0)  # the best AP anywhere: still near 0
    backbones = ["mit_b0"]
    table = ap_by_class_and_backbone(backbones, collect(backbones, project), project)
    fig = heatmap_figure(table, backbones, max_classes=10)
    ax = fig.axes[0]
    image = ax.images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    assert "colour scale fixed at AP 0-1" in ax.get_title()
    # the cell of AP 0.0025 is drawn in the bottom colour of the map, not the top one
    cell = image.to_rgba(image.get_array())[0, 0]
    assert np.allclose(cell, image.cmap(0.0), atol=0.01) and not np.allclose(cell, image.cmap(1.0), atol=0.1)


def test_classes_at_ap_0_are_no_ap_yet_not_ranked_alphabetically(tmp_path):
    zeros = {n: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "recall": 0.0, "num_preds": 2, "num_gt": 3}
             for n in ("apple", "banana", "cherry")}
    write_backbone(tmp_path, "mit_b0", ap=0.2, ms=10.0, params_m=20.0, per_class={
        **zeros, "zebra": {"AP": 0.4, "AP50": 0.5, "AP75": 0.3, "recall": 0.5, "num_preds": 3, "num_gt": 2},
        "yak": {"AP": 0.1, "AP50": 0.2, "AP75": 0.0, "recall": 0.2, "num_preds": 3, "num_gt": 2}})
    out = build_report(["mit_b0"], ReportParams(), root=tmp_path)
    assert out["classes"] == {"best": [["zebra", 0.4], ["yak", 0.1]], "worst": [], "no_ap_yet":
                              ["apple", "banana", "cherry"]}
    md = (tmp_path / REPORT_MD).read_text()
    assert "Best: zebra (0.400), yak (0.100)." in md
    assert "No AP yet (AP 0 on every evaluated backbone, 3 classes): apple, banana, cherry." in md
    write_backbone(tmp_path, "mit_b0", ap=0.0, ms=10.0, params_m=20.0, per_class=zeros)
    build_report(["mit_b0"], ReportParams(), root=tmp_path)
    md = (tmp_path / REPORT_MD).read_text()
    assert "Best: none: no AP yet" in md and "apple (" not in md


def test_by_split_table_and_the_classes_that_moved(project):
    from mitdet.report import SPLIT_CLASS_K
    names = [f"c{i:02d}" for i in range(SPLIT_CLASS_K + 2)]
    val = {n: {"AP": 0.5, "num_gt": 3} for n in names}
    # on night: c00 drops most, c01 gains most, c11 unchanged (the smallest change, left out), c10 no GT there
    night = {n: {"AP": 0.5 - 0.01 * i, "num_gt": 3} for i, n in enumerate(names)}
    night.update({"c00": {"AP": 0.1, "num_gt": 3}, "c01": {"AP": 0.9, "num_gt": 3}, "c11": {"AP": 0.5, "num_gt": 3},
                  "c10": {"AP": None, "num_gt": 0}})
    for b in ("mit_b0", "mit_b1"):
        write_backbone(project, b, ap=0.2, ms=10.0, params_m=20.0, per_class=val)
        ev = read_json(project / BackbonePaths(b).eval_metrics)
        ev["tests"] = {"night": {"AP": 0.15, "AP50": 0.3, "AP75": 0.1, "num_images": 7, "per_class": night}}
        write_json(project / BackbonePaths(b).eval_metrics, ev)
    out = build_report(["mit_b0", "mit_b1"], ReportParams(), root=project)
    split = out["by_split"]
    assert split["splits"] == ["val", "night"]
    assert split["backbones"]["mit_b1"] == {"val": {"AP": 0.2, "AP50": 0.2 + 0.2, "AP75": 0.2 * 0.8,
                                                    "num_images": 10},
                                            "night": {"AP": 0.15, "AP50": 0.3, "AP75": 0.1, "num_images": 7}}
    moved = split["classes"]["night"]
    assert len(moved) == SPLIT_CLASS_K and moved[0]["class"] == "c00" and moved[-1]["class"] == "c01"
    assert {"c10", "c11"}.isdisjoint(r["class"] for r in moved)
    assert [r["delta"] for r in moved] == sorted(r["delta"] for r in moved)
    assert moved[0] == {"class": "c00", "val_AP": 0.5, "AP": 0.1, "delta": pytest.approx(-0.4)}
    md = (project / REPORT_MD).read_text()
    assert "| mit_b0 | night | 7 | 0.150 | 0.300 | 0.100 | -0.050 |" in md
    assert "| mit_b0 | val | 10 | 0.200 | 0.400 | 0.160 | — |" in md
    assert "| c00 | 0.500 | 0.100 | -0.400 |" in md and "| c01 | 0.500 | 0.900 | +0.400 |" in md
    with open(project / REPORT_PLOTS / "ap_by_split.csv") as f:
        rows = [(r["backbone"], r["split"], r["AP"]) for r in csv.DictReader(f)]
    assert rows == [("mit_b0", "val", "0.2"), ("mit_b0", "night", "0.15"), ("mit_b1", "val", "0.2"),
                    ("mit_b1", "night", "0.15")]


def test_no_test_split_no_by_split(project):
    out = build_report(["mit_b0", "mit_b1", "mit_b2"], ReportParams(), root=project)
    assert "by_split" not in out and "By split" not in (project / REPORT_MD).read_text()


def test_a_latency_measured_on_a_busy_machine_is_marked(project):
    path = project / BackbonePaths("mit_b1").eval_metrics
    ev = read_json(path)
    write_json(path, {**ev, "machine": {"busy": True, "load_average": [3.9, 3.0, 2.5], "speed_cpu_share": 0.48}})
    out = build_report(["mit_b0", "mit_b1", "mit_b2"], ReportParams(metric="AP"), root=project)
    assert out["backbones"]["mit_b1"]["latency_busy"] is True and out["backbones"]["mit_b0"]["latency_busy"] is False
    md = (project / REPORT_MD).read_text()
    assert "| 20.0 (busy) |" in md and "busy (eval.json `machine.busy`), so inflated: mit_b1;" in md
    write_json(path, ev)  # measured again, quietly: no mark
    build_report(["mit_b0", "mit_b1", "mit_b2"], ReportParams(metric="AP"), root=project)
    assert "busy" not in (project / REPORT_MD).read_text()
