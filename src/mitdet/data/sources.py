"""prepare_data: make the chosen source (synthetic | coco2017 | local) available and write data/raw/manifest.json.

The manifest names, per split, an images folder and a COCO annotation JSON, plus a fingerprint of those files so
that the manifest (a DVC output) changes whenever the data it points at does and build_index reruns.
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
from mitdet.errors import DataError, ParamsError
from mitdet.io import file_hash, write_json
from mitdet.params import DataParams
from mitdet.paths import RAW_DIR, RAW_MANIFEST

FULL_HASH_LIMIT = 256 << 20  # below this many bytes an image folder is hashed by content, above by name+size+mtime


def prepare(data: DataParams, seed: int, root: str | Path = ".") -> dict:
    """Prepare `data.source` under `root` and write `root/data/raw/manifest.json` atomically; return it."""
    root = Path(root)
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
        splits = {}
        for split in ("train", "val"):
            paths = getattr(data.local, split)
            _require(root / paths.images, f"data.local.{split}.images", is_dir=True)
            _require(root / paths.annotations, f"data.local.{split}.annotations", is_dir=False)
            splits[split] = {"images": paths.images, "annotations": paths.annotations}
    else:  # params.py already restricts the choice; kept for callers that build DataParams by hand
        raise ParamsError(f"{data.source!r} is not a source", where="data.source", fix="choose synthetic, coco2017 or local")
    manifest = {"source": data.source, "splits": splits,
                "fingerprint": {s: fingerprint(root / d["images"], root / d["annotations"]) for s, d in splits.items()}}
    write_json(root / RAW_MANIFEST, manifest)
    return manifest


def fingerprint(images_dir: Path, annotations: Path) -> dict:
    """SHA-256 of the annotation JSON and of the image folder, subfolders included (file_name may be `sub/x.jpg`):
    contents when small, else relative names, sizes, mtimes."""
    entries = _walk_files(images_dir)
    total = sum(size for _, size, _ in entries)
    h = hashlib.sha256()
    for name, size, mtime in entries:
        h.update(f"{name}\0{size}\0".encode())
        if total <= FULL_HASH_LIMIT:
            h.update(file_hash(images_dir / name).hexdigest().encode())
        else:
            h.update(str(mtime).encode())
    return {"annotations_sha256": file_hash(annotations).hexdigest(), "images": len(entries), "images_bytes": total,
            "images_sha256": h.hexdigest(), "images_hashed_by": "content" if total <= FULL_HASH_LIMIT else "name+size+mtime"}


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
