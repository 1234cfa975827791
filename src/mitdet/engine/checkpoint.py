"""Checkpoints: atomic save/load, RNG state, the fingerprint of what shapes training, stale-run handling."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import mitdet
from mitdet import paths
from mitdet.errors import CheckpointError
from mitdet.io import atomic_path, file_hash
from mitdet.params import INFERENCE_KEYS, NOT_SHAPING_TRAIN, ModelParams, TrainParams, shaping_values

log = logging.getLogger(__name__)

# source.json carries the raw data's fingerprint: new pixels at the same size must not be resumed across
INDEX_FILES = ("train.jsonl", "categories.json", "val.jsonl", "instances_val.json", "instances_train.json",
               "source.json")


def index_hash(index_dir: str | Path) -> str:
    """Hash of the index files training reads (missing ones count as absent, by name)."""
    h = hashlib.sha256()
    for name in INDEX_FILES:
        path = Path(index_dir) / name
        h.update(name.encode())
        if path.exists():
            file_hash(path, h=h)
        else:
            h.update(b"<absent>")
    return h.hexdigest()


def code_hash() -> str:
    """Hash of the Python code that trains (paths.TRAIN_CODE under src/mitdet: also the train stages' code deps in
    dvc.yaml, so an edit that reruns training also refuses to resume across it), by relative path and content."""
    root = Path(mitdet.__file__).resolve().parent
    files = []
    for part in paths.TRAIN_CODE:
        path = root / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        file_hash(path, h=h)
    return h.hexdigest()


def fingerprint(train: TrainParams, model: ModelParams, seed: int, index_dir: str | Path,
                extra: dict | None = None) -> dict:
    """Everything that shapes a run, as a dict with one `hash` over all parts (kept readable for logs)."""
    parts = {
        "train": shaping_values(train, "train", NOT_SHAPING_TRAIN),
        "model": shaping_values(model, "model", INFERENCE_KEYS), "seed": seed,
        "index": index_hash(index_dir), "code": code_hash(), "extra": extra or {},
    }
    parts["hash"] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return parts


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Names of the parts that differ (train keys by name), for the log line."""
    out = []
    for part in ("train", "model", "seed", "index", "code", "extra"):
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if part in ("train", "model") and isinstance(a, dict) and isinstance(b, dict):
            out += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]  # dotted keys
        else:
            out.append(part)
    return out


# ------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as tensors and lists (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class preserved_rng:
    """Run a block (evaluation, creating a loader iterator) without moving the training RNG streams."""

    def __enter__(self):
        self.state = rng_state()

    def __exit__(self, *exc):
        set_rng_state(self.state)
        return False


# ------------------------------------------------------------------------------------------ save / load
def save(path: str | Path, state: dict) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves a torn checkpoint, and a full disk
    is a CheckpointError saying so (torch reports it as "unexpected pos"), the earlier file left intact."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as err:
        if not _disk_full(err, Path(path), _nbytes(state)):
            raise
        free = shutil.disk_usage(Path(path).parent).free
        raise CheckpointError(f"no space left on the device ({free // 2**20} MiB free)", where=str(path),
                              fix="free some space and rerun: the file written before this one is intact") from None


def _disk_full(err: BaseException, path: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or torch's stream writer failing where the disk has less
    room than the state needs (its temp file already removed)."""
    if getattr(err, "errno", None) == errno.ENOSPC:
        return True
    text = str(err)
    return ("unexpected pos" in text or "write failed" in text) and shutil.disk_usage(path.parent).free < needed


def _nbytes(value) -> int:
    """Bytes of the tensors in a nested state (what torch.save must write, at least)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def copy(src: str | Path, dst: str | Path) -> None:
    """A byte copy of a saved checkpoint (e.g. last.pt -> epoch_NNN.pt), through a temporary file and a rename."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load(path: str | Path) -> dict:
    """Load a checkpoint of plain tensors and containers (weights_only: no code runs from the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: name it and the fix
        raise CheckpointError(f"cannot read this checkpoint ({type(err).__name__}: {err})", where=str(path),
                              fix="move it away to start fresh") from None


def set_aside(path: str | Path, reason: str, then: str = "training starts fresh") -> Path:
    """Rename `path` to `<name>.stale-<UTC time>` (the newest such copy only is kept) and say so in one log line."""
    path = Path(path)
    for older in path.parent.glob(f"{path.name}.stale-*"):
        older.unlink(missing_ok=True)
    dest = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    path.replace(dest)
    log.warning("%s cannot be resumed (%s): moved to %s, %s", path, reason, dest.name, then)
    return dest


def load_matching(path: str | Path, fp: dict) -> dict | None:
    """The checkpoint at `path` when its fingerprint matches `fp`; a non-matching one is set aside (None)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = load(path)
    except RuntimeError as err:
        set_aside(path, str(err))
        return None
    old = state.get("fingerprint", {})
    if old.get("hash") != fp["hash"]:
        set_aside(path, "changed: " + (", ".join(fingerprint_diff(old, fp)) or "fingerprint"))
        return None
    return state


def load_resumable(directory: str | Path, fp: dict) -> tuple[dict | None, Path | None]:
    """The state to resume from and its file: last.pt when it matches `fp`, else (an unreadable last.pt, set
    aside) the newest epoch_NNN.pt of the same run: an intact copy made as its epoch ended."""
    directory = Path(directory)
    state = load_matching(directory / "last.pt", fp)
    if state is not None:
        return state, directory / "last.pt"
    for path in sorted(directory.glob("epoch_*.pt"), reverse=True):
        try:
            state = load(path)
        except CheckpointError:
            continue
        if state.get("fingerprint", {}).get("hash") == fp["hash"]:
            log.warning("resuming from %s, the newest intact checkpoint of this run", path)
            return state, path
    return None, None


def prune_periodic(directory: str | Path, keep: int) -> None:
    """Keep only the newest `keep` epoch_NNN.pt files."""
    files = sorted(p for p in Path(directory).glob("epoch_*.pt") if re.fullmatch(r"epoch_\d+\.pt", p.name))
    for p in files[: max(0, len(files) - keep)]:
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------- finished runs
# DVC never run-caches a stage with a persist output, so the train stages keep their own: each finished run's
# final state (final weights, result, logs; no optimizer) under checkpoints/finished/<fingerprint hash>.pt.
FINISHED_DIR = "finished"


def finished_path(directory: str | Path, fp: dict) -> Path:
    return Path(directory) / FINISHED_DIR / f"{fp['hash']}.pt"


def keep_finished(directory: str | Path, fp: dict, state: dict, keep: int) -> None:
    """Store a finished run's state by its fingerprint and keep only the newest `keep` of them."""
    if keep <= 0:
        return
    save(finished_path(directory, fp), state)
    stored = sorted((Path(directory) / FINISHED_DIR).glob("*.pt"), key=lambda p: p.stat().st_mtime)
    for old in stored[: max(0, len(stored) - keep)]:
        old.unlink(missing_ok=True)


def load_finished(directory: str | Path, fp: dict) -> dict | None:
    """The stored finished run of fingerprint `fp`, if any (an unreadable one is set aside)."""
    path = finished_path(directory, fp)
    if not path.exists():
        return None
    try:
        state = load(path)
    except CheckpointError as err:
        set_aside(path, str(err))
        return None
    return state if state.get("fingerprint", {}).get("hash") == fp["hash"] else None

