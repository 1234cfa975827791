"""CPU threads and kernel levels, fixed before torch is imported, and `machine_info()` for train.json/eval.json.

PyTorch, MKL and oneDNN read their thread counts and pick their CPU code paths when torch is imported (or at
their first call), so `configure_cpu` must run first; `apply_threads` then settles torch's own thread pools.
A reproducible level pins the libraries' code paths (BENCHMARKS.md, "Reproducibility and threads"): the same
thread count and the same pinned kernels give bitwise-equal weights; a different thread count does not.
"""
from __future__ import annotations

import math
import os
import platform
import sys

# Reproducible levels. `avx2` pins PyTorch's and oneDNN's kernels to AVX2 and puts MKL in its reproducible
# (CNR) mode on the AVX2 branch, which only Intel CPUs honour: elsewhere MKL takes its AUTO branch (an AMD EPYC's
# MKL_VERBOSE says "CNR:AUTO"), which is this CPU's own. `portable` runs MKL's COMPATIBLE branch, the one MKL
# code path every x86 CPU runs alike, at about 1.3-1.5x the CPU time of a step (BENCHMARKS.md).
_COMMON = {
    "ATEN_CPU_CAPABILITY": "avx2",   # PyTorch's own vectorised kernels (norms, activations, softmax, optimizer)
    "ONEDNN_MAX_CPU_ISA": "AVX2",    # convolutions and reorders
    "MKL_DYNAMIC": "FALSE",          # MKL and OpenMP keep the thread count they are given
    "OMP_DYNAMIC": "FALSE",
}
LEVELS = {"avx2": {**_COMMON, "MKL_CBWR": "AVX2"}, "portable": {**_COMMON, "MKL_CBWR": "COMPATIBLE"}}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_ENV = "OMP_WAIT_POLICY"
ENV_KEYS = (WAIT_ENV, *THREAD_ENV, *LEVELS["avx2"])


def level_env(reproducible: bool | str) -> dict[str, str]:
    """The pins of a reproducible level: False/"off"/"none" none, True/"avx2", or "portable"."""
    name = {True: "avx2", False: "off", "none": "off"}.get(reproducible, reproducible)
    if name != "off" and name not in LEVELS:
        raise ValueError(f"reproducible must be off, avx2 or portable (or a bool), not {reproducible!r}")
    return dict(LEVELS.get(name, {}))


def cpu_env(threads: int, reproducible: bool | str, environ: dict | None = None) -> dict[str, str]:
    """The environment `configure_cpu` wants: idle threads sleep (unless set), thread counts, pinned levels."""
    environ = os.environ if environ is None else environ
    env = {WAIT_ENV: environ.get(WAIT_ENV, "PASSIVE")}  # a user's own policy wins
    if threads > 0:
        env.update(dict.fromkeys(THREAD_ENV, str(threads)))
    env.update(level_env(reproducible))
    return env


def configure_cpu(threads: int, reproducible: bool | str) -> dict[str, str]:
    """Set `cpu_env` in os.environ before torch is imported; return it. Changing it after the import is a bug."""
    env = cpu_env(threads, reproducible)
    changed = sorted(k for k, v in env.items() if os.environ.get(k) != v)
    if changed and "torch" in sys.modules:
        raise RuntimeError(f"bug: configure_cpu() after `import torch`: {', '.join(changed)} would no longer "
                           "apply; call it before anything imports torch")
    os.environ.update(env)
    return env


def apply_threads(threads: int) -> None:
    """After the import: torch's intra-op (and, if not yet started, inter-op) threads to `threads` when > 0."""
    import torch
    if threads <= 0:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # the inter-op pool already started: it only serves torch.jit.fork here
            pass


def reproducible_level() -> str:
    """The reproducible level whose pins are all in force in this process's environment, else "off"."""
    for name, env in LEVELS.items():
        if all(os.environ.get(k) == v for k, v in env.items()):
            return name
    return "off"


def cpu_model() -> str:
    """/proc/cpuinfo's first "model name" (else platform.processor(), else "unknown")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """/proc/cpuinfo's first "flags" line as a set (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_cpu_level(flags: set[str] | None = None) -> str:
    """The highest ATEN_CPU_CAPABILITY this CPU supports: avx512, avx2 or default."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _clean(value):
    """JSON-safe: NaN/inf become None, containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _accelerator(device) -> dict:
    """The device's name and CUDA/cuDNN versions, where torch has them."""
    import torch
    dev = torch.device(device) if device is not None else torch.device("cpu")
    info = {"device": str(dev), "cuda": torch.version.cuda, "cudnn": None, "gpu": None}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def machine_info(device=None) -> dict:
    """Where and how this process computes: CPU, kernel level, cores, threads, versions, device, pins, load."""
    import torch
    import torchvision
    info = {"cpu_model": cpu_model(), "cpu_best_level": best_cpu_level(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "reproducible": reproducible_level(),
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "load_average": _load()}
    info.update(_accelerator(device))
    return _clean(info)
