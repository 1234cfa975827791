"""One comparison of all backbones, from metrics/ only: report.json, a markdown table, CSVs and PNG charts.

A backbone whose metrics are absent (or that params.backbones leaves out) is reported as missing, with its
numbers null, never zero.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mitdet.io import atomic_path, csv_text, read_json, write_json, write_text
from mitdet.params import BACKBONE_NAMES, ReportParams
from mitdet.paths import REPORT_AP_BY_SPLIT_CSV, REPORT_JSON, REPORT_MD, REPORT_PLOTS, REPORT_SUMMARY, BackbonePaths

ROW_KEYS = ("AP", "AP50", "AP75", "params_m", "gflops", "images_per_s", "ms_per_image", "latency_busy",
            "train_minutes", "best_epoch", "train_images_per_s")
CLASS_TABLE_K = 5  # best and worst classes listed in report.md
SPLIT_KEYS = ("AP", "AP50", "AP75")  # per backbone and split in report.json "by_split" and report.md
SPLIT_CLASS_K = 10  # classes listed per test split in report.md: the largest changes of AP against val
HEATMAP_SCALE = (0.0, 1.0)  # AP's own range: a fixed scale keeps 0.0025 dark and makes runs comparable


def _num(value) -> float | None:
    """A finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def collect(backbones: list[str], root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """Per backbone (all six, in order): status ok|missing, a reason when missing, and the ROW_KEYS values."""
    root = Path(root)
    rows: dict[str, dict[str, Any]] = {}
    for b in list(BACKBONE_NAMES) + [b for b in backbones if b not in BACKBONE_NAMES]:
        row: dict[str, Any] = {"status": "missing", "reason": None, **{k: None for k in ROW_KEYS}}
        rows[b] = row
        if b not in backbones:
            row["reason"] = "not in params.backbones"
            continue
        p = BackbonePaths(b)
        ev, tr = _read(root / p.eval_metrics), _read(root / p.train_metrics)
        if ev is None:
            row["reason"] = f"{p.eval_metrics} absent: run `dvc repro evaluate_{b}`"
            continue
        row["status"] = "ok"
        for k in ("AP", "AP50", "AP75", "params_m", "gflops", "images_per_s", "ms_per_image"):
            row[k] = _num(ev.get(k))
        machine = ev.get("machine")  # eval.json's verdict on its own speed measurement
        row["latency_busy"] = bool(isinstance(machine, dict) and machine.get("busy") is True)
        tr = tr or {}
        seconds = _num(tr.get("seconds"))
        row["train_minutes"] = seconds / 60.0 if seconds is not None else None
        best_epoch = tr.get("best_epoch")
        row["best_epoch"] = best_epoch if isinstance(best_epoch, int) and not isinstance(best_epoch, bool) else None
        row["train_images_per_s"] = _num(tr.get("images_per_s"))
        if row["params_m"] is None and _num(tr.get("params")) is not None:
            row["params_m"] = _num(tr["params"]) / 1e6
        if not tr:
            row["reason"] = f"{p.train_metrics} absent: training figures are null"
    return rows


def pareto_set(points: dict[str, tuple[float | None, float | None]]) -> list[str]:
    """Names whose (cost, score) no other point beats: cost no higher and score no lower, one of them strictly.

    Points with a None coordinate take no part. Sorted by cost.
    """
    valid = {n: (c, s) for n, (c, s) in points.items() if c is not None and s is not None}
    front = [n for n, (c, s) in valid.items()
             if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for m, (c2, s2) in valid.items() if m != n)]
    return sorted(front, key=lambda n: (valid[n][0], n))


def ap_by_class_and_backbone(backbones: list[str], rows: dict[str, dict],
                             root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """class -> {backbone: AP or None, '_num_gt': the largest GT count any backbone saw} over backbones with metrics."""
    root = Path(root)
    table: dict[str, dict[str, Any]] = {}
    for b in backbones:
        if rows.get(b, {}).get("status") != "ok":
            continue
        per_class = _read(root / BackbonePaths(b).per_class_metrics) or {}
        for name, r in per_class.items():
            entry = table.setdefault(name, {"_num_gt": 0})
            r = r or {}
            entry[b] = _num(r.get("AP"))
            entry["_num_gt"] = max(entry["_num_gt"], int(r.get("num_gt") or 0))
    return table


def class_ranking(table: dict[str, dict[str, Any]], backbones: list[str], k: int = CLASS_TABLE_K) -> dict[str, Any]:
    """Best and worst `k` classes by mean AP over the backbones that scored them, [name, mean AP] each, and the
    classes with no AP yet (AP 0 on every one: ties that no order ranks, so they are named, not ranked)."""
    means = {}
    for c, e in table.items():
        v = [e[b] for b in backbones if e.get(b) is not None]
        if v:
            means[c] = sum(v) / len(v)
    ranked = sorted((c for c, m in means.items() if m > 0), key=lambda c: (-means[c], c))
    top = ranked[:k]
    bottom = ranked[max(len(top), len(ranked) - k):][::-1]  # worst first, none repeated from the best
    return {"best": [[c, means[c]] for c in top], "worst": [[c, means[c]] for c in bottom],
            "no_ap_yet": sorted(c for c, m in means.items() if m == 0)}


def _class_lines(classes: dict[str, Any] | None) -> list[str]:
    """report.md's class section (none for a report.json written before it had `classes`)."""
    if not classes:
        return []
    lines = ["", "### Classes (mean AP over the evaluated backbones)", ""]
    if classes["best"]:
        lines.append("Best: " + ", ".join(f"{c} ({_fmt(m)})" for c, m in classes["best"]) + ".")
    else:
        lines.append("Best: none: no AP yet (no class has AP above 0).")
    if classes["worst"]:
        lines.append("Worst: " + ", ".join(f"{c} ({_fmt(m)})" for c, m in classes["worst"]) + ".")
    if classes["no_ap_yet"]:
        names = classes["no_ap_yet"]
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        lines.append(f"No AP yet (AP 0 on every evaluated backbone, {len(names)} classes): {shown}.")
    return lines


def _split_entry(ev: dict) -> dict[str, Any]:
    return {**{k: _num(ev.get(k)) for k in SPLIT_KEYS}, "num_images": ev.get("num_images")}


def by_split(rows: dict[str, dict], root: str | Path = ".") -> dict[str, Any] | None:
    """Each evaluated backbone's SPLIT_KEYS on val and on each test split of its eval.json ("tests"), and per test
    split the classes whose AP moved most against val; None when no backbone has a test split."""
    root = Path(root)
    names, table, classes = ["val"], {}, {}
    for b, r in rows.items():
        if r["status"] != "ok":
            continue
        p = BackbonePaths(b)
        ev = _read(root / p.eval_metrics) or {}
        tests = ev.get("tests") if isinstance(ev.get("tests"), dict) else {}
        table[b] = {"val": _split_entry(ev), **{s: _split_entry(t or {}) for s, t in tests.items()}}
        names += [s for s in tests if s not in names]
        val_classes = _read(root / p.per_class_metrics) or {}
        for s, t in tests.items():
            for c, row in ((t or {}).get("per_class") or {}).items():
                pair = (_num((val_classes.get(c) or {}).get("AP")), _num((row or {}).get("AP")))
                if None not in pair:
                    classes.setdefault(s, {}).setdefault(c, []).append(pair)
    if len(names) == 1:
        return None
    return {"splits": names, "backbones": table,
            "classes": {s: class_deltas(classes.get(s, {})) for s in names[1:]}}


def class_deltas(pairs: dict[str, list[tuple[float, float]]], k: int = SPLIT_CLASS_K) -> list[dict[str, Any]]:
    """The `k` classes whose mean AP (over the backbones that scored both) changed most from val to a test split,
    largest drop first: {class, val_AP, AP, delta}."""
    rows = []
    for c, v in pairs.items():
        val_ap, ap = sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)
        rows.append({"class": c, "val_AP": val_ap, "AP": ap, "delta": ap - val_ap})
    rows.sort(key=lambda r: (-abs(r["delta"]), r["class"]))
    return sorted(rows[:k], key=lambda r: (r["delta"], r["class"]))


def _split_lines(splits: dict[str, Any] | None) -> list[str]:
    """report.md's "by split" section: AP per backbone and split, then the classes that moved per test split."""
    if not splits:
        return []
    lines = ["", "### By split (val and the test splits)", "", "| backbone | split | images | AP | AP50 | AP75 | "
             "AP - val AP |", "|---|---|---:|---:|---:|---:|---:|"]
    for b, per_split in splits["backbones"].items():
        val_ap = per_split["val"]["AP"]
        for s in splits["splits"]:
            if s not in per_split:
                continue
            r = per_split[s]
            delta = r["AP"] - val_ap if s != "val" and None not in (r["AP"], val_ap) else None
            lines.append(f"| {b} | {s} | {_fmt(r['num_images'])} | {_fmt(r['AP'])} | {_fmt(r['AP50'])} | "
                         f"{_fmt(r['AP75'])} | {_signed(delta)} |")
    for s, rows in splits["classes"].items():
        lines += ["", f"#### Classes on {s} against val (mean AP over the backbones; the {len(rows)} largest "
                  "changes)", ""]
        if not rows:
            lines.append("No class with AP on both val and this split.")
            continue
        lines += [f"| class | val AP | {s} AP | change |", "|---|---:|---:|---:|"]
        lines += [f"| {r['class']} | {_fmt(r['val_AP'])} | {_fmt(r['AP'])} | {_signed(r['delta'])} |" for r in rows]
    return lines


def _signed(v) -> str:
    return "—" if v is None else f"{v:+.3f}"


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    """The comparison as a markdown table ready for a pull request."""
    metric = report["metric"]
    best = report["best_backbone"]
    head = ["backbone", "AP", "AP50", "AP75", "params (M)", "GFLOPs", "images/s", "ms/image", "train min",
            "best epoch", "Pareto"]
    lines = [f"## Backbone comparison (ranked by {metric})", "", "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 2) + ":---:|"]
    for b, r in report["backbones"].items():
        if r["status"] != "ok":
            cells = [b, "missing"] + [""] * (len(head) - 2)
        else:
            cells = [b, _fmt(r["AP"]), _fmt(r["AP50"]), _fmt(r["AP75"]), _fmt(r["params_m"], 2),
                     _fmt(r["gflops"], 2), _fmt(r["images_per_s"], 1),
                     _fmt(r["ms_per_image"], 1) + (" (busy)" if r.get("latency_busy") else ""),
                     _fmt(r["train_minutes"], 1), _fmt(r["best_epoch"]), "yes" if r["pareto"] else ""]
            if b == best:  # the name and the ranking metric in bold
                metric_col = head.index(metric)
                cells[0], cells[metric_col] = f"**{cells[0]}**", f"**{cells[metric_col]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if best is not None:
        lines.append(f"Best by {metric}: **{best}** ({_fmt(report['backbones'][best][metric])}).")
    else:
        lines.append(f"No backbone has an {metric} yet.")
    lines.append(f"Speed/accuracy Pareto set (ms/image against {metric}): {', '.join(report['pareto']) or 'none'}.")
    busy = [b for b, r in report["backbones"].items() if r.get("latency_busy")]
    if busy:
        lines.append(f"Latency measured while the machine was busy (eval.json `machine.busy`), so inflated: "
                     f"{', '.join(busy)}; the Pareto set may be wrong. Run `dvc repro -f evaluate_<b>` on a quiet "
                     "machine.")
    missing = [f"{b} ({report['backbones'][b]['reason']})" for b in report["missing"]]
    if missing:
        lines.append(f"Missing: {'; '.join(missing)}.")
    lines += _class_lines(report.get("classes"))
    lines += _split_lines(report.get("by_split"))
    lines.append("")
    lines.append("AP is COCO AP@[.50:.95] on the validation split; ms/image is batch-1 latency on the evaluating "
                 "device; GFLOPs at the model's input size (min_size x max_size).")
    return "\n".join(lines) + "\n"


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _scatter_png(report: dict, x_key: str, x_label: str, front: list[str], front_label: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    pts = {b: (r[x_key], r[metric]) for b, r in report["backbones"].items()
           if r["status"] == "ok" and r[x_key] is not None and r[metric] is not None}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if pts:
        ax.scatter([p[0] for p in pts.values()], [p[1] for p in pts.values()], s=40, color="tab:blue", zorder=3)
        for b, (x, y) in pts.items():
            ax.annotate(b, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        fx = [pts[b] for b in front if b in pts]
        if fx:
            ax.plot([p[0] for p in fx], [p[1] for p in fx], "--", color="tab:red", zorder=2,
                    drawstyle="steps-post")  # the best score reachable at each cost
            ax.scatter([p[0] for p in fx], [p[1] for p in fx], s=140, facecolors="none", edgecolors="tab:red",
                       zorder=4, label=front_label)
            ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no backbone evaluated yet", ha="center", va="center", transform=ax.transAxes)
    absent = [b for b, r in report["backbones"].items() if b not in pts]
    if absent:
        ax.set_title(f"not shown (missing or no value): {', '.join(absent)}", fontsize=8, loc="left")
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    _save_png(fig, path)


def _heatmap_png(table: dict, backbones: list[str], max_classes: int, path: Path) -> None:
    _save_png(heatmap_figure(table, backbones, max_classes), path)


def heatmap_figure(table: dict, backbones: list[str], max_classes: int):
    """The per-class AP heatmap (classes x backbones) on the fixed 0-1 AP scale, as a matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [b for b in backbones if any(b in e for e in table.values())]
    classes = [c for c, e in table.items() if any(e.get(b) is not None for b in cols)]
    total = len(classes)
    # the most frequent classes, shown best first
    classes = sorted(classes, key=lambda c: (-table[c]["_num_gt"], c))[:max_classes]

    def mean_ap(c):
        v = [table[c][b] for b in cols if table[c].get(b) is not None]
        return sum(v) / len(v)

    classes.sort(key=lambda c: (-mean_ap(c), c))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(len(cols), 1), 1.2 + 0.28 * max(len(classes), 1)))
    if classes and cols:
        data = np.array([[np.nan if table[c].get(b) is None else table[c][b] for b in cols] for c in classes])
        lo, hi = HEATMAP_SCALE
        im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        for i in range(len(classes)):
            for j in range(len(cols)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if data[i, j] < lo + 0.6 * (hi - lo) else "black")
        fig.colorbar(im, ax=ax, label="AP")
        shown = f"{len(classes)} most frequent of {total} classes" if len(classes) < total else f"{total} classes"
        ax.set_title(f"AP per class ({shown}; blank: no GT; colour scale fixed at AP {lo:g}-{hi:g})", fontsize=9)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-class metrics yet", ha="center", va="center", transform=ax.transAxes)
    return fig


def ap_by_split_csv(rows: dict[str, dict], splits: dict[str, Any] | None) -> str:
    """backbone, split, AP, AP50, AP75 (grouped bars in dvc plots): val for each evaluated backbone, and each of
    its test splits."""
    if splits is None:
        table = {b: {"val": {k: r[k] for k in SPLIT_KEYS}} for b, r in rows.items() if r["status"] == "ok"}
    else:
        table = splits["backbones"]
    return csv_text(["backbone", "split", *SPLIT_KEYS],
                    [[b, s, *(r[k] for k in SPLIT_KEYS)] for b, per in table.items() for s, r in per.items()])


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """summary.json, the report stage's DVC metric: the best backbone and its score."""
    best, metric = out["best_backbone"], out["metric"]
    return {"best_backbone": best, f"best_{metric}": out["backbones"][best][metric] if best else None}


def build_report(backbones: list[str], report: ReportParams, root: str | Path = ".") -> dict[str, Any]:
    """Read metrics/ for `backbones` (params.backbones); write report.json, report.md and plots/report/."""
    root = Path(root)
    metric = report.metric
    rows = collect(backbones, root)
    ok = {b: r for b, r in rows.items() if r["status"] == "ok"}
    pareto = pareto_set({b: (r["ms_per_image"], r[metric]) for b, r in ok.items()})
    pareto_params = pareto_set({b: (r["params_m"], r[metric]) for b, r in ok.items()})
    for b, r in rows.items():
        measured = r["status"] == "ok" and r["ms_per_image"] is not None and r[metric] is not None
        r["pareto"] = (b in pareto) if measured else None
    ranked = [b for b, r in ok.items() if r[metric] is not None]
    best = max(ranked, key=lambda b: ok[b][metric]) if ranked else None  # ties: the first (smaller) backbone
    table = ap_by_class_and_backbone(backbones, rows, root)
    out = {"metric": metric, "best_backbone": best, "pareto": pareto, "pareto_params": pareto_params,
           "missing": [b for b, r in rows.items() if r["status"] != "ok"], "backbones": rows,
           "classes": class_ranking(table, backbones)}
    splits = by_split(rows, root)
    if splits is not None:  # absent without a test split: report.json as before
        out["by_split"] = splits

    write_json(root / REPORT_JSON, out)
    write_json(root / REPORT_SUMMARY, summary(out))
    write_text(root / REPORT_MD, markdown(out))

    plots = root / REPORT_PLOTS
    keys = ["AP", "AP50", "AP75"]
    write_text(plots / "ap_vs_params.csv", csv_text(
        ["backbone", "params_m", "gflops", *keys, "pareto"],
        [[b, r["params_m"], r["gflops"], *(r[k] for k in keys), int(b in pareto_params)]
         for b, r in ok.items() if r["params_m"] is not None and r[metric] is not None]))
    write_text(plots / "ap_vs_latency.csv", csv_text(
        ["backbone", "ms_per_image", "images_per_s", *keys, "pareto"],
        [[b, r["ms_per_image"], r["images_per_s"], *(r[k] for k in keys), int(b in pareto)]
         for b, r in ok.items() if r["ms_per_image"] is not None and r[metric] is not None]))
    write_text(plots / "per_class_ap.csv", csv_text(
        ["class", "backbone", "AP"],
        [[c, b, e[b]] for c, e in table.items() for b in backbones if e.get(b) is not None]))
    write_text(root / REPORT_AP_BY_SPLIT_CSV, ap_by_split_csv(rows, splits))
    _scatter_png(out, "params_m", "parameters (M)", pareto_params, f"Pareto front (fewer params, higher {metric})",
                 plots / "ap_vs_params.png")
    _scatter_png(out, "ms_per_image", "latency (ms per image, batch 1)", pareto,
                 f"Pareto front (faster, higher {metric})", plots / "ap_vs_latency.png")
    _heatmap_png(table, backbones, report.heatmap_max_classes, plots / "per_class_heatmap.png")
    return out
