"""The runner every stages/*.py script shares: its arguments, its logging, and one `error:` line for a user's mistake.

A stage is `main(argv) -> int` run by `run(main)`: a MitdetError (a bad params.yaml, a missing index, a failed
download...) prints `error: <where>: <what>; <fix>` on stderr and exits with its `exit_code` (2 for params, else
1); any other exception is a bug and keeps its traceback. A stage that computes calls `prepare_cpu` right after
loading params and before anything imports torch.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from mitdet import runtime
from mitdet.errors import MitdetError, ParamsError
from mitdet.params import BACKBONE_NAMES, Params
from mitdet.params import load_params as _load_params


def parse_args(doc: str, argv: list[str] | None = None, *, backbone: bool = False) -> argparse.Namespace:
    """`--params` (default params.yaml) and, with `backbone`, a required `--backbone` among BACKBONE_NAMES."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if backbone:
        parser.add_argument("--backbone", required=True, choices=BACKBONE_NAMES)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def check_backbone(backbone: str, params: Params, params_path: str = "params.yaml") -> None:
    """A ParamsError unless `backbone` is in params.yaml's `backbones:` (dvc.yaml has a stage only for those)."""
    if backbone not in params.backbones:
        raise ParamsError(f"{backbone} is not listed in `backbones:` ({', '.join(params.backbones)})",
                          where=str(params_path), fix=f"add {backbone} there and run `make dvc-yaml`")


def setup_logging(progress_bar: bool = False) -> None:
    """INFO log lines on stderr: through tqdm for a stage with a progress bar (train), else `LEVEL logger: msg`."""
    if progress_bar:
        from mitdet.engine.logs import setup_logging as tqdm_logging  # imports tqdm: only the stage that needs it
        tqdm_logging()
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def prepare_cpu(threads: int, reproducible: bool | str = False) -> dict[str, str]:
    """Fix CPU threads and a `reproducible` level (off, avx2, portable) before torch is imported; returns the env."""
    return runtime.configure_cpu(threads, reproducible)


def error_line(err: BaseException) -> str:
    """`error: <message>` on one line (a YAML parser's message, for one, spans several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    rank = os.environ.get("RANK", "0")
    return f"error: rank {rank}: {text}" if rank != "0" else f"error: {text}"  # under torchrun: which worker


_PARAMS_READ: dict[str, str] = {}  # params file -> sha256 of what the stage read


def load_params(path: str = "params.yaml") -> Params:
    """params.load_params, remembering the file's content: `run` refuses to finish when it changed meanwhile."""
    params = _load_params(path)
    _PARAMS_READ[str(path)] = _digest(path)
    return params


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "<unreadable>"


def check_params_unchanged() -> None:
    """A ParamsError when a params file read at the start differs now: DVC records the params it finds at the
    end of a stage, so the stage must fail rather than let dvc.lock claim params its outputs were not made with."""
    for path, digest in _PARAMS_READ.items():
        if _digest(path) != digest:
            raise ParamsError("changed while this stage ran: its outputs follow the params read at its start",
                              where=path, fix="run the stage again (`dvc repro`)")


def run(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `main()`'s code; a MitdetError exits with one `error:` line and its exit_code, no traceback.

    A full disk (ENOSPC) is a user's problem too: one line naming the file."""
    try:
        code = main()
        if not code:
            check_params_unchanged()
    except MitdetError as err:
        sys.stdout.flush()  # what the stage printed before the error comes first
        print(error_line(err), file=sys.stderr)
        code = err.exit_code
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(error_line(MitdetError(f"no space left on the device ({err.strerror})", where=err.filename,
                                     fix="free some space and rerun")), file=sys.stderr)
        code = 1
    sys.exit(code or 0)
