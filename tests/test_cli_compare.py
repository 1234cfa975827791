"""`mitdet compare`: per-class AP of the workspace against a git revision, read through DVC; --max-drop gates CI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.cli_fixtures import run_cli

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

PER_CLASS = "metrics/mit_b0/per_class.json"
# how dvc.yaml may declare per_class.json: a metric, a plain uncached output, or an output in the DVC cache
DECLARATIONS = {
    "metric": "    metrics:\n    - metrics/mit_b0/per_class.json:\n        cache: false\n",
    "plain_output": "    outs:\n    - metrics/mit_b0/per_class.json:\n        cache: false\n",
    "cached_output": "    outs:\n    - metrics/mit_b0/per_class.json\n",
}


def _run(root, *args):
    subprocess.run(args, cwd=root, check=True, capture_output=True, text=True)


def _write(root, aps: dict[str, float | None]) -> None:
    """per_class.json through the stage's copy of src.json (so a cached output is recorded in dvc.lock)."""
    rows = {n: {"AP": ap, "AP50": None if ap is None else min(1.0, ap + 0.2), "num_gt": 3} for n, ap in aps.items()}
    (root / "src.json").write_text(json.dumps(rows))
    _run(root, sys.executable, "-m", "dvc", "repro", "-q")


def make_repo(root, declaration: str, commits: list[dict]) -> None:
    """git + dvc repo: an evaluate stage declaring per_class.json; one commit per entry of `commits`."""
    root.mkdir(parents=True, exist_ok=True)
    _run(root, "git", "init", "-q")
    _run(root, "git", "config", "user.email", "test@example.com")
    _run(root, "git", "config", "user.name", "test")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "config", "core.autostage", "false")
    (root / "metrics/mit_b0").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages:\n  evaluate_mit_b0:\n    cmd: cp src.json metrics/mit_b0/per_class.json\n"
                                   "    deps:\n    - src.json\n" + DECLARATIONS[declaration])
    for n, aps in enumerate(commits):
        _write(root, aps)
        _run(root, "git", "add", "-A")
        _run(root, "git", "commit", "-q", "-m", f"metrics {n}")


BASE = {"cat": 0.50, "dog": 0.30, "bird": 0.20, "fish": None}
HEAD = {"cat": 0.52, "dog": 0.31, "bird": 0.20, "fish": None}
NOW = {"cat": 0.40, "dog": 0.33, "bird": 0.185, "fish": 0.1, "newt": 0.2}


@pytest.fixture(scope="module", params=list(DECLARATIONS))
def repo(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_repo(root, request.param, [BASE, HEAD])
    _write(root, NOW)  # the workspace: not committed
    return root


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("class")) + 1
    return [ln.split() for ln in lines[start:] if ln.startswith("  ") and not ln.strip().startswith("mean")]


def test_the_table_is_sorted_by_change_largest_drop_first(repo, capsys):
    code, out, err = run_cli(["compare", "--root", str(repo)], capsys)
    assert code == 0, err
    assert out.startswith("mit_b0: per-class AP (points, 0-100), HEAD -> workspace")
    assert _table_rows(out) == [["cat", "52.0", "40.0", "-12.0"], ["bird", "20.0", "18.5", "-1.5"],
                                ["dog", "31.0", "33.0", "+2.0"], ["fish", "n/a", "10.0", "n/a"],
                                ["newt", "n/a", "20.0", "n/a"]]
    assert "mean change -3.83 points over 3 classes" in out


def test_an_older_revision(repo, capsys):
    code, out, _ = run_cli(["compare", "HEAD~1", "--root", str(repo)], capsys)
    assert code == 0 and "HEAD~1 -> workspace" in out
    assert _table_rows(out)[:3] == [["cat", "50.0", "40.0", "-10.0"], ["bird", "20.0", "18.5", "-1.5"],
                                    ["dog", "30.0", "33.0", "+3.0"]]


@pytest.mark.parametrize("max_drop, code, flagged", [("15", 0, []), ("10", 1, ["cat"]), ("1", 1, ["cat", "bird"]),
                                                     ("1.5", 1, ["cat"])])
def test_max_drop_sets_the_exit_code(repo, capsys, max_drop, code, flagged):
    got, _, err = run_cli(["compare", "HEAD", "--max-drop", max_drop, "--root", str(repo)], capsys)
    assert got == code
    assert [ln.split()[2].rstrip(":") for ln in err.splitlines() if ln.startswith("REGRESSION")] == flagged


def test_unknown_revision_and_not_a_repository(tmp_path, capsys, repo):
    code, _, err = run_cli(["compare", "no-such-rev", "--root", str(repo)], capsys)
    assert code == 1 and err.startswith("error: REV: ") and "no-such-rev" in err
    code, _, err = run_cli(["compare", "--root", str(tmp_path)], capsys)
    assert code == 1 and "not inside a DVC repository" in err


def test_a_backbone_new_since_the_revision_is_noted_not_failed(tmp_path, capsys):
    root = tmp_path / "r"
    make_repo(root, "plain_output", [])
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "no metrics yet")
    _write(root, NOW)
    code, out, _ = run_cli(["compare", "--max-drop", "0", "--root", str(root)], capsys)
    assert code == 0 and f"no {PER_CLASS} at HEAD: nothing to compare against" in out


def test_a_cached_baseline_missing_from_the_cache_says_so(tmp_path, capsys):
    root = tmp_path / "r"
    make_repo(root, "cached_output", [BASE])
    _write(root, NOW)
    shutil.rmtree(root / ".dvc" / "cache")
    code, _, err = run_cli(["compare", "--root", str(root)], capsys)
    assert code == 1 and f"error: {PER_CLASS}: cannot be read at HEAD" in err and "dvc pull" in err


def test_an_unchanged_backbone_is_one_line():
    from mitdet.compare import BackboneComparison, class_changes, comparison_text

    same = BackboneComparison("mit_b1", class_changes({"cat": {"AP": 0.5}, "dog": {"AP": None}},
                                                      {"cat": {"AP": 0.5}, "dog": {"AP": None}}))
    assert comparison_text([same], "HEAD") == ("mit_b1: per-class AP (points, 0-100), HEAD -> workspace: "
                                               "the same AP for all 2 classes")
