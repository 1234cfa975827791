"""mitdet.runtime: CPU env set before torch (refused after), machine_info, and bitwise-equal pinned trainings."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from mitdet import runtime
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_reproducible  # noqa: E402

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in runtime.ENV_KEYS}


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with src/ importable and no CPU env of ours inherited."""
    full = {**CLEAN_ENV, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_cpu_env_threads_and_pins():
    assert runtime.cpu_env(0, False, environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = runtime.cpu_env(3, True, environ={"OMP_WAIT_POLICY": "ACTIVE"})
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's own setting wins
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert {k: env[k] for k in runtime.LEVELS["avx2"]} == runtime.LEVELS["avx2"]
    assert runtime.cpu_env(0, "portable", environ={})["MKL_CBWR"] == "COMPATIBLE"
    assert runtime.cpu_env(0, "off", environ={}) == runtime.cpu_env(0, False, environ={})
    with pytest.raises(ValueError, match="off, avx2 or portable"):
        runtime.cpu_env(0, "avx512")


def test_configure_cpu_applies_at_torch_import():
    proc = python("import json, os, sys\nfrom mitdet import runtime\n"
                  "runtime.configure_cpu(1, True)\nassert 'torch' not in sys.modules\nimport torch\n"
                  "print(json.dumps([torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(),"
                  " os.environ['OMP_WAIT_POLICY']]))")
    assert proc.returncode == 0, proc.stderr
    threads, capability, policy = json.loads(proc.stdout)
    assert threads == 1 and policy == "PASSIVE"
    if runtime.best_cpu_level() != "default":
        assert capability == "AVX2"  # pinned below this CPU's best level


def test_configure_cpu_refused_after_torch_import():
    proc = python("import torch\nfrom mitdet import runtime\nruntime.configure_cpu(1, True)")
    assert proc.returncode != 0
    assert "bug: configure_cpu() after `import torch`" in proc.stderr
    again = python("from mitdet import runtime\nruntime.configure_cpu(2, True)\nimport torch\n"
                   "runtime.configure_cpu(2, True)\nruntime.apply_threads(2)\nassert torch.get_num_threads() == 2")
    assert again.returncode == 0, again.stderr  # the same env again changes nothing: allowed


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_stage_prepares_cpu_before_torch(script):
    """The stage calls stage.prepare_cpu before anything imports torch (stopped right there)."""
    code = (
        "import runpy, sys\nfrom mitdet import stage\ncalls = []\n"
        "def stop(threads, reproducible=False):\n"
        "    calls.append('torch' in sys.modules)\n    raise SystemExit(0)\n"
        "stage.prepare_cpu = stop\n"
        f"sys.argv = ['{script}.py', '--backbone', 'mit_b0', '--params', r'{ROOT / 'params.yaml'}']\n"
        f"try:\n    runpy.run_path(r'{ROOT / 'stages' / script}.py', run_name='__main__')\n"
        "finally:\n    print(calls)\n")
    proc = python(code)
    assert proc.stdout.strip().splitlines()[-1] == "[False]", proc.stdout + proc.stderr


def test_machine_info_fields_json_clean():
    info = runtime.machine_info("cpu")
    for key in ("cpu_model", "cpu_capability", "logical_cores", "threads", "torch", "torchvision", "cuda",
                "device", "env", "load_average", "reproducible"):
        assert key in info
    assert info["device"] == "cpu" and info["threads"] >= 1 and info["cpu_model"]
    json.dumps(info, allow_nan=False)
    assert runtime._clean({"x": [float("nan"), math.inf, 1.5]}) == {"x": [None, None, 1.5]}


def test_pinned_runs_equal_and_thread_counts_reported(capsys):
    """Same pins and thread count: bitwise-equal weights (run side by side, so also under load); 1 vs 2 threads
    is only reported (the bench's table), not asserted."""
    cfgs = [{"name": name, "threads": t, "reproducible": True, "steps": 2, "batch": 1, "env": {}}
            for name, t in (("pinned t1", 1), ("pinned t1 again", 1), ("pinned t2", 2))]
    with ThreadPoolExecutor(len(cfgs)) as pool:
        rows = list(pool.map(lambda c: bench_reproducible.run_child(c, timeout=300), cfgs))
    assert all("hash" in r for r in rows), [r.get("error") for r in rows]
    assert rows[0]["hash"] == rows[1]["hash"]
    assert rows[0]["machine"]["reproducible"] == "avx2" and rows[2]["machine"]["threads"] == 2
    bench_reproducible.report(rows, lambda row: None)
    out = capsys.readouterr().out
    assert f"{rows[0]['hash'][:12]}: pinned t1, pinned t1 again" in out and "pinned t2" in out
