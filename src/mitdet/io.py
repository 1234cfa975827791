"""Atomic writes, strict JSON, file hashes and finite numbers: every file a stage writes goes through here."""
from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mitdet.errors import DataError

try:  # 20x faster on large files (500k predictions: 0.25 s against 6 s), NaN/Infinity written as null
    import orjson
except ImportError:  # pragma: no cover - the standard module gives the same JSON values
    orjson = None

_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace("-", "_").replace("/", "_") or "host"  # '-' separates a temp name's fields
LEGACY_TEMP_AGE_S = 86400  # temps named before they carried a pid: removed once this old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success flush it to disk and rename it over `path`, on error
    remove it. Temporaries that interrupted writers of `path` left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        _fsync(tmp)  # the data first: after a power cut the renamed file must not be empty
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # then the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove `.<name>.<host>-<pid>-*.tmp` beside `path` whose writer (a process on this host) is gone; return how
    many. Temporaries of live processes, or of other hosts sharing the folder, are left alone."""
    path = Path(path)
    prefix, removed = f".{path.name}.", 0
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        if _is_stale(tmp.name[len(prefix):-len(".tmp")], tmp):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _is_stale(middle: str, tmp: Path) -> bool:
    """`middle` is `<host>-<pid>-<random>`: stale when the pid is dead on this host; a bare 8-character random
    part (the older naming) is stale after LEGACY_TEMP_AGE_S."""
    fields = middle.rsplit("-", 2)  # mkstemp's random part has no '-'
    if len(fields) == 3 and fields[0] == _HOST and fields[1].isdigit():
        return int(fields[1]) != os.getpid() and not pid_alive(int(fields[1]))
    if re.fullmatch(r"[a-z0-9_]{8}", middle):
        with contextlib.suppress(OSError):
            return time.time() - tmp.stat().st_mtime > LEGACY_TEMP_AGE_S
    return False


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a written file to disk (an error here is a disk error and raises)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk; skipped where folders cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    if orjson is not None and indent in (None, 2):
        try:
            return orjson.dumps(value, option=_ORJSON_OPTIONS[indent]).decode()
        except TypeError:  # a type orjson does not know (a torch scalar, a 65-bit int): the portable path
            pass
    return json.dumps(clean_json(value), indent=indent, allow_nan=False) + "\n"


if orjson is not None:
    _ORJSON_OPTIONS = {indent: orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
                       | (orjson.OPT_INDENT_2 if indent == 2 else 0) for indent in (None, 2)}


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
