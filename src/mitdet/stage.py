"""The runner every stages/*.py script shares: its arguments, its logging, and one `error:` line for a user's mistake.

A stage is `main(argv) -> int` run by `run(main)`: a MitdetError (a bad params.yaml, a missing index, a failed
download...) prints `error: <where>: <what>; <fix>` on stderr and exits with its `exit_code` (2 for params, else
1); any other exception is a bug and keeps its traceback. A stage that computes calls `prepare_cpu` right after
loading params and before anything imports torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, NoReturn

from mitdet import runtime
from mitdet.errors import MitdetError, ParamsError
from mitdet.params import BACKBONE_NAMES, Params


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


def run(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `main()`'s code; a MitdetError exits with one `error:` line and its exit_code, no traceback."""
    try:
        code = main()
    except MitdetError as err:
        sys.stdout.flush()  # what the stage printed before the error comes first
        print(error_line(err), file=sys.stderr)
        code = err.exit_code
    sys.exit(code or 0)
