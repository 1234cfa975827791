"""Watching a training run from the files the train stage writes: a refreshing view, alerts, the final summary.

Reads `plots/<b>/train_batches.csv`, `plots/<b>/val_history.csv`, `metrics/<b>/train.json` (its `total_steps`,
`steps`, `finished` while running; the summary once done) and, if present, `metrics/<b>/per_class.json`. The
alerts are the trainer's own (engine/monitor.py): a non-finite loss, a loss above SPIKE_RATIO x its moving
average, validation worse WORSE_IN_A_ROW times in a row.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mitdet.engine.monitor import EMA_DECAY, SPIKE_RATIO, WORSE_IN_A_ROW
from mitdet.errors import DataError
from mitdet.io import read_json
from mitdet.paths import BackbonePaths

RATE_WINDOW = 20   # log rows the speed (and so the ETA) is measured over
CLEAR = "\x1b[H\x1b[2J"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """CSV rows as numbers (None for empty cells), leaving out a last line still being written."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a row half written by the trainer: read it next time
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row = {}
        for key, value in raw.items():
            if key is None:
                continue
            try:
                row[key] = float(value) if value not in ("", None) else None
            except ValueError:
                row[key] = value  # the timestamp
        rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):  # being replaced right now, or not JSON: no information this time
        return None


@dataclass
class RunFiles:
    """What a run has written so far."""
    backbone: str
    batches: list[dict]
    val: list[dict]
    train_json: dict | None
    per_class: dict | None
    weights: bool
    updated: float | None  # mtime of the batch log
    per_class_updated: float | None = None  # mtime of per_class.json


def read_run(root: str | os.PathLike, backbone: str) -> RunFiles:
    root, bp = Path(root), BackbonePaths(backbone)
    log = root / bp.train_batches_csv
    train_json = _read_json(root / bp.train_metrics)
    per_class_path = root / bp.per_class_metrics
    per_class = _read_json(per_class_path)
    return RunFiles(backbone, read_rows(log), read_rows(root / bp.val_history_csv),
                    train_json if isinstance(train_json, dict) else None,
                    per_class if isinstance(per_class, dict) else None,
                    (root / bp.weights).is_file(), _mtime(log), _mtime(per_class_path))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def is_finished(run: RunFiles) -> bool:
    """train.json says so (`finished`), or, from a trainer that writes it only at the end, it is there with
    the weights (steps == total_steps, or stopped early)."""
    tj = run.train_json
    if not tj:
        return False
    if "finished" in tj:
        return bool(tj["finished"])
    steps, total = tj.get("steps"), tj.get("total_steps")
    if isinstance(steps, (int, float)) and isinstance(total, (int, float)) and not tj.get("early_stopped"):
        return steps >= total and run.weights
    return run.weights


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


@dataclass
class Health:
    """The loss's moving average and the alerts, replayed over the logs as engine/monitor.py raises them."""
    loss_avg: float | None = None
    alerts: list[str] = field(default_factory=list)


def health(batches: list[dict], val: list[dict], metric: str) -> Health:
    h = Health()
    for row in batches:
        loss, step = row.get("loss"), int(row.get("step") or 0)
        if not _finite(loss):  # the trainer logs an empty loss when every step since the last row was non-finite
            why = "every step since the last row skipped" if loss is None else loss
            h.alerts.append(f"step {step}: non-finite loss ({why})")
            continue
        if h.loss_avg is not None and loss > SPIKE_RATIO * h.loss_avg:
            h.alerts.append(f"step {step}: loss spike {loss:.4g}, more than {SPIKE_RATIO:g}x its moving average "
                            f"{h.loss_avg:.4g}")
        h.loss_avg = loss if h.loss_avg is None else EMA_DECAY * h.loss_avg + (1 - EMA_DECAY) * loss
    last, worse = None, 0
    for row in val:
        value = row.get(metric)
        if not _finite(value):
            continue
        worse = worse + 1 if last is not None and value < last else 0
        if worse >= WORSE_IN_A_ROW:
            h.alerts.append(f"step {int(row.get('step') or 0)}: validation {metric} got worse {worse} times in a "
                            f"row (now {value:.4f})")
        last = value
    return h


def _timestamp(row: dict) -> float | None:
    value = row.get("timestamp")
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def steps_per_second(batches: list[dict]) -> float | None:
    """Optimizer steps per second over the last RATE_WINDOW log rows (from their timestamps)."""
    timed = [(r["step"], t) for r in batches[-RATE_WINDOW:] if r.get("step") is not None
             and (t := _timestamp(r)) is not None]
    if len(timed) < 2 or timed[-1][1] <= timed[0][1]:
        return None
    return (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def eta_seconds(run: RunFiles) -> float | None:
    """Time left at the recent speed (log timestamps) or, before two rows, train.json's steps per second so far."""
    tj = run.train_json or {}
    total, rate = tj.get("total_steps"), steps_per_second(run.batches)
    if not rate and _number(tj.get("steps")) and _number(tj.get("seconds")) and tj["seconds"] > 0:
        rate = tj["steps"] / tj["seconds"]
    if not run.batches or not _number(total) or not rate:
        return None
    return max(0.0, (total - run.batches[-1]["step"]) / rate)


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    return str(dt.timedelta(seconds=int(round(seconds))))


def _num(v, fmt: str = ".4f") -> str:
    return "n/a" if v is None else (f"{v:{fmt}}" if isinstance(v, float) else str(v))


def _metric(run: RunFiles) -> str:
    return str((run.train_json or {}).get("monitor") or "AP50")


def progress_text(run: RunFiles) -> str:
    """`step S/T (P%)  epoch E  ETA`."""
    last = run.batches[-1]
    total = (run.train_json or {}).get("total_steps")
    step = int(last["step"])
    of = f"/{int(total)} ({100.0 * step / total:.1f}%)" if isinstance(total, (int, float)) and total else ""
    return f"step {step}{of}  epoch {_num(last.get('epoch'), '.0f')}  ETA {_clock(eta_seconds(run))}"


def validation_text(run: RunFiles) -> str:
    if not run.val:
        return "validation: none yet"
    v = run.val[-1]
    return (f"validation (step {_num(v.get('step'), '.0f')}): AP {_num(v.get('AP'))}  AP50 {_num(v.get('AP50'))}  "
            f"AP75 {_num(v.get('AP75'))}")


def classes_text(run: RunFiles, n: int = 3) -> str | None:
    """Best and worst classes by AP (points) from per_class.json, or None without one."""
    if not run.per_class:
        return None
    rows = sorted(((r["AP"], name) for name, r in run.per_class.items()
                   if isinstance(r, dict) and isinstance(r.get("AP"), (int, float))), reverse=True)
    if not rows:
        return None
    # evaluate runs after train: a per_class.json older than the run's last log row is an earlier model's
    fresh = run.updated is not None and run.per_class_updated is not None and run.per_class_updated >= run.updated
    when = "this run's evaluation" if fresh else "an evaluation before this run"
    fmt = ", ".join
    return (f"classes by AP ({when}): best {fmt(f'{c} {100 * a:.1f}' for a, c in rows[:n])}; "
            f"worst {fmt(f'{c} {100 * a:.1f}' for a, c in rows[::-1][:n])}")


def frame(run: RunFiles, now: float | None = None) -> str:
    """The full view of a run in progress (what a terminal shows, refreshed)."""
    bp = BackbonePaths(run.backbone)
    if not run.batches:
        return f"{run.backbone}: waiting for {bp.train_batches_csv} (no step logged yet)"
    now = time.time() if now is None else now
    h = health(run.batches, run.val, _metric(run))
    last = run.batches[-1]
    ago = f", updated {_clock(now - run.updated)} ago" if run.updated else ""
    parts = "  ".join(f"{k.removeprefix('loss_')} {_num(v)}" for k, v in last.items() if k.startswith("loss_"))
    lines = [f"mitdet monitor: {run.backbone} ({bp.train_batches_csv}{ago})", progress_text(run),
             f"loss {_num(last.get('loss'))}  avg {_num(h.loss_avg)}   {parts}",
             f"lr {_num(last.get('lr'), '.3g')}   {_num(last.get('images_per_s'), '.1f')} images/s",
             validation_text(run)]
    lines += [f"ALERT {a}" for a in h.alerts[-5:]] or ["alerts: none"]
    lines += [t for t in [classes_text(run)] if t]
    return "\n".join(lines)


def line(run: RunFiles) -> str:
    """One plain line per logged step (no terminal)."""
    last = run.batches[-1]
    h = health(run.batches, run.val, _metric(run))
    val = f" | val AP {_num(run.val[-1].get('AP'))} AP50 {_num(run.val[-1].get('AP50'))}" if run.val else ""
    return (f"{run.backbone} {progress_text(run)}  loss {_num(last.get('loss'))} (avg {_num(h.loss_avg)})  "
            f"lr {_num(last.get('lr'), '.3g')}  {_num(last.get('images_per_s'), '.1f')} images/s{val}")


def summary(run: RunFiles) -> str:
    """The summary of a finished run: train.json's figures, the last validation, alerts, classes."""
    tj = run.train_json or {}
    h = health(run.batches, run.val, _metric(run))
    monitor = _metric(run)
    lines = [f"{run.backbone} finished: {_num(tj.get('steps'))} steps, {_num(tj.get('epochs'), 'g')} epochs in "
             f"{_clock(tj.get('seconds'))} ({_num(tj.get('images_per_s'), '.1f')} images/s); final loss "
             f"{_num(tj.get('final_loss'))}",
             f"best {monitor} {_num(tj.get('best_metric'))} at step {_num(tj.get('best_step'))} (epoch "
             f"{_num(tj.get('best_epoch'))}); weights from {tj.get('weights_from', 'n/a')}"
             f"{'; stopped early' if tj.get('early_stopped') else ''}",
             validation_text(run).replace("validation", "last validation", 1)]
    lines.append(f"alerts during the run: {len(h.alerts)}" + "".join(f"\n  {a}" for a in h.alerts[-5:]))
    lines += [t for t in [classes_text(run)] if t]
    return "\n".join(lines)


def latest_backbone(root: str | os.PathLike) -> str:
    """The backbone whose batch log changed last: the run most likely going on."""
    from mitdet.params import BACKBONE_NAMES
    paths = [(Path(root) / BackbonePaths(b).train_batches_csv, b) for b in BACKBONE_NAMES]
    logs = [(p.stat().st_mtime, b) for p, b in paths if p.is_file()]
    if not logs:
        raise DataError("no training run found (no plots/<backbone>/train_batches.csv)",
                        where=str(Path(root).resolve()),
                        fix="name the backbone (`mitdet monitor mit_b0`) to wait for its run, or start one with "
                            "`dvc repro train_mit_b0`")
    return max(logs)[1]


def watch(root: str | os.PathLike, backbone: str, *, interval: float = 2.0, once: bool = False,
          timeout: float = 0.0, out: TextIO | None = None, tty: bool | None = None) -> int:
    """Show the run until it finishes (0, after its summary); `once`: one view; 1 when `timeout` s pass first."""
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    start, printed_step, printed_alerts = time.monotonic(), None, 0
    while True:
        run = read_run(root, backbone)
        finished = is_finished(run)
        if once or finished:
            text = summary(run) if finished else frame(run)
            print(text, file=out, flush=True)
            return 0
        if tty:
            out.write(CLEAR + frame(run) + "\n")
            out.flush()
        elif run.batches and run.batches[-1]["step"] != printed_step:
            alerts = health(run.batches, run.val, _metric(run)).alerts
            for alert in alerts[printed_alerts:]:
                print(f"ALERT {alert}", file=out)
            printed_step, printed_alerts = run.batches[-1]["step"], len(alerts)
            print(line(run), file=out, flush=True)
        elif printed_step is None and not run.batches:
            print(frame(run), file=out, flush=True)
            printed_step = -1  # said once that it is waiting
        if timeout and time.monotonic() - start > timeout:
            print(f"{backbone}: the run did not finish within {timeout:g} s", file=out, flush=True)
            return 1
        time.sleep(interval)
