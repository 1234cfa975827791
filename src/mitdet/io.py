"""Atomic writes, strict JSON, file hashes and finite numbers: every file a stage writes goes through here."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mitdet.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def clean_json(value: Any) -> Any:
    """Replace NaN and +-Infinity by None (JSON null) anywhere in a structure; numpy scalars become Python's."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalar
    if isinstance(value, float):
        return finite_or_none(value)
    return value


def finite_or_none(value: Any) -> float | None:
    """`value` as a float when it is a finite number (numpy/torch scalars too, bool not), else None."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def file_hash(path: str | os.PathLike, algorithm: str = "sha256", h=None):
    """Feed the bytes of `path` into `h` (a new `algorithm` hash when None) and return it: `.hexdigest()`."""
    h = h if h is not None else hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def dumps_json(value: Any, indent: int | None = 2) -> str:
    """JSON text with NaN/Infinity replaced by null; raises if anything non-finite slips through."""
    return json.dumps(clean_json(value), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    write_text(path, dumps_json(value, indent=indent))


def csv_text(header: list[str], rows) -> str:
    """CSV text with a header row; floats as %.6g, None as an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def read_json(path: str | os.PathLike) -> Any:
    """Parse JSON, refusing NaN and Infinity; a malformed file is a DataError naming it (a missing one is not)."""
    def refuse(token):
        raise DataError(f"holds {token}, which is not JSON", where=str(path))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=refuse)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"not valid JSON ({err})", where=str(path)) from None
