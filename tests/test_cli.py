"""The `mitdet` console script: its commands, its help, and one `error:` line for a user's mistake."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.cli_fixtures import run_cli

COMMANDS = ("predict", "export", "score", "compare", "monitor")


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert f"    {command} " in out
    assert "Exit codes" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_help(capsys, command):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: mitdet {command}")


def test_max_drop_says_its_scale(capsys):
    out = run_cli(["compare", "--help"], capsys)[1]
    assert "AP points, on the 0-100 scale" in " ".join(out.split())


def test_a_command_line_mistake_exits_2(capsys):
    code, _, err = run_cli(["predict"], capsys)
    assert code == 2 and "--model" in err
    assert run_cli([], capsys)[0] == 2


def test_the_project_installs_the_console_script():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    if "mitdet" not in scripts:
        pytest.skip("the installed mitdet metadata predates its console script: reinstall with `make`")
    assert scripts["mitdet"] == "mitdet.cli:main"
    script = Path(sys.executable).parent / "mitdet"
    if not script.exists():
        pytest.skip(f"{script} is not installed in this environment")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "predict" in done.stdout


def test_errors_are_one_line_from_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mitdet.cli", "score", str(tmp_path / "gt.json"),
                           str(tmp_path / "d.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
