"""prepare_data: make the chosen source (synthetic | coco2017 | local | yolo) available; write data/raw/manifest.json.

The manifest names, per split, an images folder, a COCO annotation JSON and optionally an aux folder (aligned
auxiliary images, same file stems), plus a fingerprint of those files so that the manifest (a DVC output) changes
whenever the data it points at does and build_index reruns. Split names: train, val, then the test splits listed
in `tests`. The yolo source adds `conversion`: per split, what its label conversion kept and skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
from pathlib import Path

from mitdet.data.download import prepare_coco2017
from mitdet.data.synthetic import generate
from mitdet.data.yolo import prepare_yolo
from mitdet.errors import DataError, ParamsError
from mitdet.io import file_hash, write_json
from mitdet.params import DataParams
from mitdet.paths import RAW_DIR, RAW_MANIFEST

FULL_HASH_LIMIT = 256 << 20  # below this many bytes an image folder is hashed by content, above by name+size+mtime


def prepare(data: DataParams, seed: int, root: str | Path = ".") -> dict:
    """Prepare `data.source` under `root` and write `root/data/raw/manifest.json` atomically; return it."""
    root = Path(root)
    extra: dict = {}
    if data.source == "synthetic":
        out = root / RAW_DIR / "synthetic"
        tmp = root / RAW_DIR / ".synthetic.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        generated = generate(tmp, data.synthetic, seed)  # generated aside, then swapped in: no stale files survive
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        splits = {s: {k: (Path(RAW_DIR) / "synthetic" / Path(v).relative_to(tmp)).as_posix() for k, v in d.items()}
                  for s, d in generated.items()}
    elif data.source == "coco2017":
        cfg = data.coco2017
        if not Path(cfg.download_dir).is_absolute():
            cfg = _with_dir(cfg, str(root / cfg.download_dir))
        splits = prepare_coco2017(cfg, seed)
        splits = {s: {k: _relative(v, root) for k, v in d.items()} for s, d in splits.items()}
    elif data.source == "local":
        splits = _local_splits(data, root)
    elif data.source == "yolo":
        splits, extra["conversion"] = prepare_yolo(data.yolo, seed, root)
    else:  # params.py already restricts the choice; kept for callers that build DataParams by hand
        raise ParamsError(f"{data.source!r} is not a source", where="data.source",
                          fix="choose synthetic, coco2017, local or yolo")
    manifest = {"source": data.source, "splits": splits, "tests": [s for s in splits if s not in ("train", "val")],
                "fingerprint": _fingerprints(splits, root), **extra}
    write_json(root / RAW_MANIFEST, manifest)
    return manifest


def _local_splits(data: DataParams, root: Path) -> dict:
    """The splits of data.local (train, val, then each test split), every path checked."""
    splits = {}
    named = {"train": ("data.local.train", data.local.train), "val": ("data.local.val", data.local.val),
             **{name: (f"data.local.tests.{name}", paths) for name, paths in data.local.tests.items()}}
    for split, (key, paths) in named.items():
        _require(root / paths.images, f"{key}.images", is_dir=True)
        _require(root / paths.annotations, f"{key}.annotations", is_dir=False)
        splits[split] = {"images": paths.images, "annotations": paths.annotations}
        if paths.aux is not None:
            _require(root / paths.aux, f"{key}.aux", is_dir=True)
            splits[split]["aux"] = paths.aux
    return splits


def _fingerprints(splits: dict, root: Path) -> dict:
    """`fingerprint` of every split; a folder shared by splits (yolo's seeded val) is hashed once."""
    folders: dict = {}

    def folder(path: str) -> dict:
        key = str(root / path)
        if key not in folders:
            folders[key] = folder_hash(root / path)
        return folders[key]

    out = {}
    for s, d in splits.items():
        out[s] = fingerprint(root / d["images"], root / d["annotations"], folder=folder(d["images"]))
        if "aux" in d:
            out[s].update({f"aux{k[6:]}": v for k, v in folder(d["aux"]).items()})
    return out


def fingerprint(images_dir: Path, annotations: Path, folder: dict | None = None) -> dict:
    """SHA-256 of the annotation JSON and of the image folder (`folder_hash`, or `folder` when already hashed)."""
    return {"annotations_sha256": file_hash(annotations).hexdigest(),
            **(folder if folder is not None else folder_hash(images_dir))}


def folder_hash(folder: Path) -> dict:
    """SHA-256 of a folder, subfolders included (file_name may be `sub/x.jpg`): contents when small, else
    relative names, sizes, mtimes."""
    entries = _walk_files(folder)
    total = sum(size for _, size, _ in entries)
    h = hashlib.sha256()
    for name, size, mtime in entries:
        h.update(f"{name}\0{size}\0".encode())
        if total <= FULL_HASH_LIMIT:
            h.update(file_hash(folder / name).hexdigest().encode())
        else:
            h.update(str(mtime).encode())
    return {"images": len(entries), "images_bytes": total, "images_sha256": h.hexdigest(),
            "images_hashed_by": "content" if total <= FULL_HASH_LIMIT else "name+size+mtime"}


def _walk_files(folder: Path) -> list[tuple[str, int, int]]:
    """(path relative to `folder` with `/`, size, mtime_ns) of every regular file below it, sorted (deterministic);
    links followed as the index follows them, FIFOs and devices skipped (reading one would block)."""
    entries, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link loop (or a folder linked twice): walked once
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: the index reports the file as missing
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append((Path(path).relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(entries)


def _require(path: Path, key: str, is_dir: bool) -> None:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "an images folder" if is_dir else "a COCO annotation JSON file"
        raise DataError(f"not found or not {kind}", where=f"{key} = {path}",
                        fix="set it in params.yaml (relative to the project root, or absolute)")


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _with_dir(cfg, download_dir: str):
    return dataclasses.replace(cfg, download_dir=download_dir)
