"""Per-class AP of the workspace against a git revision, per backbone, read through DVC's metrics API.

`metrics/<b>/per_class.json` is read with `Repo.metrics.show(revs=[rev], targets=[...])`, which takes a path
whether dvc.yaml declares it a metric or a plain output (git-tracked, or in the DVC cache). Changes are in AP
points (0-100), largest drops first.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mitdet.errors import DataError
from mitdet.params import BACKBONE_NAMES
from mitdet.paths import BackbonePaths

WORKSPACE = "workspace"


@dataclass
class ClassChange:
    """One class's AP (0-1, None without ground truth) at the revision and in the workspace."""
    name: str
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        """after - before in AP points (0-100); None unless both are known."""
        if self.before is None or self.after is None:
            return None
        return round(100.0 * (self.after - self.before), 9)  # 0.185 - 0.2 is a drop of 1.5, not 1.5000000000000013


@dataclass
class BackboneComparison:
    backbone: str
    rows: list[ClassChange]
    note: str = ""  # why there is nothing to compare (no metrics on one side)


def _ap(row) -> float | None:
    value = row.get("AP") if isinstance(row, dict) else None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def class_changes(before: dict, after: dict) -> list[ClassChange]:
    """Every class of either side, largest drop first; classes without a change (unknown AP) last, by name."""
    rows = [ClassChange(n, _ap(before.get(n)), _ap(after.get(n))) for n in sorted(set(before) | set(after))]
    return sorted(rows, key=lambda r: (r.change is None, r.change if r.change is not None else 0.0, r.name))


def _open_repo(root: str | os.PathLike):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise DataError("not inside a DVC repository", where=str(Path(root).resolve()),
                        fix="run `mitdet compare` in the project (a git repository with `dvc init` done)") from None


def _entry_data(repo, rev: str, rel: str, entry: dict | None):
    """The JSON of one shown file, None when the file does not exist at `rev`; a DataError when unreadable."""
    error = None if entry is None else entry.get("error")
    if entry is not None and error is None:
        return entry.get("data")
    if rev != WORKSPACE:
        from dvc.api import DVCFileSystem
        exists = DVCFileSystem(repo.root_dir, rev=rev).exists(rel)  # from git and dvc.lock: needs no cache
    else:
        exists = os.path.exists(os.path.join(repo.root_dir, rel))
    if not exists:
        return None
    fix = f"run `dvc pull` (or `dvc fetch --all-commits`) so the cache holds {rev}'s copy" if rev != WORKSPACE else \
        "rerun its evaluate stage"
    raise DataError(f"cannot be read at {rev} ({error})", where=rel, fix=fix)


def read_per_class(root: str | os.PathLike, rev: str, backbones: list[str]) -> dict[str, dict]:
    """{backbone: {"workspace": per_class or None, rev: per_class or None}} through `metrics.show`."""
    from dvc.scm import RevError
    repo = _open_repo(root)
    try:
        rels = {b: BackbonePaths(b).per_class_metrics for b in backbones}
        targets = [os.path.join(repo.root_dir, r) for r in rels.values()]
        try:
            shown = repo.metrics.show(revs=[rev], targets=targets)
        except RevError as err:
            raise DataError(str(err), where="REV", fix="name a commit, branch or tag of this repository") from None
        out: dict[str, dict] = {}
        for b, rel in rels.items():
            out[b] = {}
            for side in (WORKSPACE, rev):
                files = shown.get(side, {}).get("data", {})
                entry = files.get(rel) or next((v for k, v in files.items() if Path(k).as_posix().endswith(rel)),
                                               None)
                data = _entry_data(repo, side, rel, entry)
                if data is not None and not isinstance(data, dict):
                    raise DataError(f"holds a {type(data).__name__} at {side}, not a per-class object", where=rel)
                out[b][side] = data
        return out
    finally:
        repo.close()


def compare(root: str | os.PathLike = ".", rev: str = "HEAD",
            backbones: list[str] | None = None) -> list[BackboneComparison]:
    """Per backbone with metrics on either side, the per-class AP changes from `rev` to the workspace."""
    shown = read_per_class(root, rev, list(backbones or BACKBONE_NAMES))
    out = []
    for b, sides in shown.items():
        before, after = sides[rev], sides[WORKSPACE]
        if before is None and after is None:
            continue
        note = ""
        if before is None:
            note = f"no {BackbonePaths(b).per_class_metrics} at {rev}: nothing to compare against"
        elif after is None:
            note = f"no {BackbonePaths(b).per_class_metrics} in the workspace: run `dvc repro evaluate_{b}`"
        out.append(BackboneComparison(b, class_changes(before or {}, after or {}) if not note else [], note))
    return out


def drops_over(comparisons: list[BackboneComparison], max_drop: float) -> list[tuple[str, ClassChange]]:
    """(backbone, class) pairs whose AP fell by more than `max_drop` points."""
    return [(c.backbone, r) for c in comparisons for r in c.rows if r.change is not None and r.change < -max_drop]


def _points(v: float | None) -> str:
    return "n/a" if v is None else f"{100.0 * v:.1f}"


def comparison_text(comparisons: list[BackboneComparison], rev: str) -> str:
    """One table per backbone: class, AP at `rev`, AP now, change (points), largest drops first."""
    if not comparisons:
        return f"no metrics/<backbone>/per_class.json in the workspace or at {rev}"
    out = []
    for c in comparisons:
        out.append(f"{c.backbone}: per-class AP (points, 0-100), {rev} -> workspace")
        if c.note:
            out += [f"  {c.note}", ""]
            continue
        if all(r.before == r.after for r in c.rows):  # the common case for backbones not retrained: one line
            out[-1] += f": the same AP for all {len(c.rows)} classes"
            continue
        width = max([len(r.name) for r in c.rows] + [5])
        label = rev if len(rev) <= 10 else rev[:10]
        out.append(f"  {'class':<{width}}  {label:>10}  {'workspace':>9}  {'change':>7}")
        for r in c.rows:
            change = "n/a" if r.change is None else f"{r.change:+.1f}"
            out.append(f"  {r.name:<{width}}  {_points(r.before):>10}  {_points(r.after):>9}  {change:>7}")
        known = [r.change for r in c.rows if r.change is not None]
        if known:
            out.append(f"  mean change {sum(known) / len(known):+.2f} points over {len(known)} classes")
        out.append("")
    return "\n".join(out).rstrip()
