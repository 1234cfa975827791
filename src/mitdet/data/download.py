"""COCO 2017 download: resumable HTTP Range transfers with retries, verified before use, safely extracted.

What is verified: each zip's size (Content-Length and the known size) and its MD5 against the table below (or a
checksum passed in); the `*.part` file becomes the final name only after that. An archive whose entries would land
outside the target folder is refused before anything is written. At the end, every image the annotation JSON lists
must exist, and the counts must be COCO's (118,287 train / 5,000 val) unless a subset was asked.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mitdet.data.headers import probe
from mitdet.data.index import read_coco
from mitdet.errors import DataError, DownloadError
from mitdet.io import file_hash, read_json, write_json

log = logging.getLogger(__name__)

# The official archives: size in bytes and MD5 (as published by cocodataset.org mirrors and checked by many
# download scripts). A mirror must serve the same bytes.
KNOWN_FILES = {
    "zips/train2017.zip": {"size": 19336861798, "md5": "cced6f7f71b7629ddf16f17bbcfab6b2"},
    "zips/val2017.zip": {"size": 815585330, "md5": "442b8da7639aecaf257c1dceb8ba8c80"},
    "annotations/annotations_trainval2017.zip": {"size": 252907541, "md5": "f4bbac642086de4f52a3fdda2de5fa2c"},
}
COCO_COUNTS = {"train": 118287, "val": 5000}
CHUNK = 1 << 20
MAX_IMAGE_BYTES = 256 << 20  # a single subset image larger than this is refused (COCO's are under 1 MB)
MAX_RATIO = 200  # an entry expanding more than this is refused: images do not compress, COCO's JSON about 5x
RATIO_FROM = 1 << 20  # ... when it is larger than this (a small file of zeros may legitimately compress 1000x)
MIN_RATE = 1024  # bytes/s: a transfer slower than this over `timeout_s` seconds counts as stalled (and is retried)
RERUN = "run `dvc repro prepare_data` again"


class ChecksumError(DownloadError):
    """A downloaded file whose size or checksum is not the expected one."""


class UnsafeArchiveError(DownloadError):
    """A zip entry that would be written outside the extraction folder."""


@dataclass(frozen=True)
class Expected:
    """What a downloaded file must be: size in bytes and/or an MD5 hex digest (either may be unknown)."""
    size: int | None = None
    md5: str | None = None


# ------------------------------------------------------------------------------------------------ transfer
def download_file(url: str, dest: str | Path, expected: Expected = Expected(), *, retries: int = 5,
                  timeout_s: float = 60.0, backoff_s: float = 1.0, progress: bool = True, stamp: bool = True,
                  max_bytes: int | None = None, check: Callable[[Path], str] | None = None) -> Path:
    """Fetch `url` to `dest` through `dest.part`, resuming with HTTP Range; rename only once verified (size, MD5,
    `check(part)` returning "" for a whole file); a verified `dest` (`.verified.json` stamp) is not fetched again."""
    # Nothing past the expected size (or `max_bytes` when unknown) is written. A checksum mismatch removes the
    # .part and raises ChecksumError naming both sums; a file `check` refuses is removed and fetched afresh.
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _is_verified(dest, expected):
        return dest
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_into(url, part, expected.size, timeout_s, progress, max_bytes)
            _check_content(part, check)
            break
        except DownloadError:  # an OSError too, but final (HTTP 4xx): no retry
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Incomplete) as err:
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"failed after {retries} retries ({_reason(err)})", where=url,
                                    fix=f"check the network and data.coco2017.base_url, then {RERUN} to resume "
                                        f"from {have} bytes") from None
            wait = min(backoff_s * 2 ** (attempt - 1), 60.0)
            log.warning("%s: %s; retry %d/%d in %.1f s (resuming)", url, err, attempt, retries, wait)
            time.sleep(wait)
    _verify(part, dest.name, expected)
    os.replace(part, dest)
    if stamp:
        _stamp(dest, expected)
    return dest


class _Incomplete(Exception):
    """The server closed the connection before sending everything, stalled, or sent a broken file."""


def _reason(err: Exception) -> str:
    """The short cause of a transfer error (URLError wraps the socket's)."""
    return str(getattr(err, "reason", None) or err)


def _check_content(part: Path, check: Callable[[Path], str] | None) -> None:
    """Remove `part` and raise _Incomplete (retried) when `check` finds it broken."""
    problem = check(part) if check is not None else ""
    if problem:
        part.unlink(missing_ok=True)
        raise _Incomplete(f"the file received {problem}")


class _RateGuard:
    """Raise _Incomplete when fewer than MIN_RATE * window bytes arrived in a window of `window` seconds: a
    server that trickles a byte at a time never trips the socket timeout, yet would never finish."""

    def __init__(self, window: float):
        self.window, self.min_bytes = window, max(1, int(MIN_RATE * window))
        self.start, self.got = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.got += n
        now = time.monotonic()
        if now - self.start >= self.window:
            if self.got < self.min_bytes:
                raise _Incomplete(f"stalled: {self.got} bytes in {now - self.start:.1f} s, fewer than "
                                  f"{self.min_bytes} (the minimum over data.coco2017.timeout_s)")
            self.start, self.got = now, 0


def _fetch_into(url: str, part: Path, size: int | None, timeout_s: float, progress: bool,
                max_bytes: int | None = None) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # a stale or foreign .part: start over
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the .part is complete (verified next)
            return
        if 400 <= err.code < 500:
            raise DownloadError(f"HTTP {err.code} {err.reason}", where=url, fix="check data.coco2017.base_url") from None
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start from zero
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else size
        if size is not None:
            total = size  # never more than the expected size, whatever the server announces
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                disable=not progress, mininterval=1.0) as bar:
            _copy_body(resp, f, bar, have, total, max_bytes, timeout_s, url)
        got = part.stat().st_size
        if total is not None and got < total:
            raise _Incomplete(f"connection closed at {got} of {total} bytes")


def _copy_body(resp, f, bar, have: int, total: int | None, max_bytes: int | None, timeout_s: float, url: str) -> None:
    """Copy the response into `f` up to `total` bytes (or `max_bytes` when unknown), guarding the rate."""
    limit = total if total is not None else (max_bytes if max_bytes is not None else None)
    guard = _RateGuard(timeout_s)
    while limit is None or have < limit:
        chunk = resp.read1(CHUNK if limit is None else min(CHUNK, limit - have))  # read1: whatever has arrived
        if not chunk:
            return
        f.write(chunk)
        have += len(chunk)
        bar.update(len(chunk))
        guard.add(len(chunk))
    if total is None and resp.read1(1):  # no size known and still more: the cap was reached
        raise DownloadError(f"larger than {max_bytes} bytes, the most expected for this file", where=url,
                            fix="check data.coco2017.base_url: a mirror must serve the official files")


def _verify(part: Path, name: str, expected: Expected) -> None:
    size = part.stat().st_size
    if expected.size is not None and size != expected.size:
        part.unlink()
        raise ChecksumError(f"size mismatch: expected {expected.size} bytes, got {size}", where=name,
                            fix=f"the partial file was removed; {RERUN} to download it afresh")
    if expected.md5 is not None:
        actual = file_hash(part, "md5").hexdigest()
        if actual != expected.md5.lower():
            part.unlink()
            raise ChecksumError(f"MD5 mismatch: expected {expected.md5}, actual {actual}", where=name,
                                fix=f"the download was removed (a corrupt mirror or transfer); {RERUN} to retry")
    elif name.endswith(".zip"):  # no checksum known: at least every member's CRC must hold
        try:
            with zipfile.ZipFile(part) as zf:
                bad = zf.testzip()
        except zipfile.BadZipFile as err:
            bad = str(err)
        if bad is not None:
            part.unlink()
            raise ChecksumError(f"not a valid zip (first bad entry: {bad})", where=name,
                                fix=f"the download was removed; {RERUN} to retry")


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _stamp(dest: Path, expected: Expected) -> None:
    st = dest.stat()
    write_json(_stamp_path(dest), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected.md5})


def _is_verified(dest: Path, expected: Expected) -> bool:
    if not dest.exists() or not _stamp_path(dest).exists():
        return False
    try:
        stamp = read_json(_stamp_path(dest))
    except ValueError:
        return False
    st = dest.stat()
    return (stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
            and (expected.md5 is None or stamp.get("md5") == expected.md5)
            and (expected.size is None or expected.size == st.st_size))


# ----------------------------------------------------------------------------------------------- extraction
def safe_extract(archive: str | Path, target: str | Path) -> int:
    """Extract `archive` under `target` (each file written atomically; returns how many), after refusing the whole
    archive if an entry is unsafe (`_check_entry`) or it would not fit on the disk."""
    # Containment is checked on the normalised path, not the resolved one: a target folder (or a folder in it,
    # such as `train2017`) that is a symbolic link to another disk is a legitimate setup, not an escape.
    target = Path(os.path.abspath(target))
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_entry(info, target, archive)
        todo = [i for i in infos if not i.is_dir() and not _already_extracted(target / i.filename, i)]
        _check_room(todo, target, archive)
        for info in todo:
            dest = target / info.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with zf.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, dest)
    return len(todo)


def _check_entry(info: zipfile.ZipInfo, target: Path, archive) -> None:
    """UnsafeArchiveError unless the entry is a plain file or folder with a clean relative name (no empty, `.` or
    `..` part) inside `target`, expanding at most MAX_RATIO times."""
    name = info.filename
    parts = (name[:-1] if info.is_dir() else name).split("/")
    dest = os.path.normpath(os.path.join(target, name))
    problem = None
    if (name.startswith(("/", "\\")) or ":" in parts[0] or os.path.commonpath([target, dest]) != str(target)):
        problem = f"entry {name!r} would be written outside {target}"
    elif any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name:
        problem = f"entry {name!r} has an empty, '.' or '..' part, a backslash or a NUL byte"
    elif (info.external_attr >> 16) & 0o170000 == 0o120000:
        problem = f"entry {name!r} is a symbolic link"
    elif info.file_size > RATIO_FROM and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        problem = (f"entry {name!r} expands {info.file_size / max(info.compress_size, 1):.0f} times (a zip bomb?); "
                   f"the limit is {MAX_RATIO}")
    if problem:
        raise UnsafeArchiveError(problem, where=str(archive), fix="refusing to extract this archive: use the official one")


def _already_extracted(dest: Path, info: zipfile.ZipInfo) -> bool:
    """Idempotent re-extraction after an interruption: a file of the entry's size is not written again."""
    return dest.is_file() and dest.stat().st_size == info.file_size


def _check_room(todo: list[zipfile.ZipInfo], target: Path, archive) -> None:
    """DownloadError when the entries still to write (their declared sizes, which zipfile enforces) exceed the
    free space of `target`'s disk."""
    needed = sum(i.file_size for i in todo)
    free = shutil.disk_usage(target).free
    if needed > free:
        raise DownloadError(f"extracting needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
                            where=str(archive), fix=f"free space on {target}'s disk or set data.coco2017.download_dir "
                                                    "elsewhere, then " + RERUN)


# ------------------------------------------------------------------------------------------------ COCO 2017
def check_free_space(folder: Path, needed: int) -> None:
    """Raise before starting when the disk holding `folder` has less than `needed` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(f"{free / 1e9:.1f} GB free, {needed / 1e9:.1f} GB needed for the download and "
                            f"extraction", where=str(folder), fix="free space or set data.coco2017.download_dir elsewhere")


def prepare_coco2017(cfg, seed: int, *, checksums: dict[str, Expected] | None = None,
                     expected_counts: dict[str, int] | None = None, progress: bool = True) -> dict[str, dict]:
    """Download, verify and extract COCO 2017 under `cfg.download_dir` (a Coco2017Params); return the splits
    {split: {"images": DIR, "annotations": JSON}}. With `cfg.subset` > 0, only the annotations zip is fetched
    and N images per split come one by one from `{base_url}/{split}2017/{file_name}`."""
    # An `.extracted-<zip>.json` marker saves re-reading a zip; when files it stands for are missing (deleted by
    # hand), the zip is extracted again (downloaded again first if it is gone too), so the next run mends it.
    root = Path(cfg.download_dir)
    base = cfg.base_url.rstrip("/")
    known = {k: Expected(**v) if isinstance(v, dict) else v for k, v in dict(KNOWN_FILES, **(checksums or {})).items()}
    counts = dict(COCO_COUNTS, **(expected_counts or {}))
    kw = dict(retries=cfg.retries, timeout_s=cfg.timeout_s, progress=progress)

    ann_key = "annotations/annotations_trainval2017.zip"
    zips = [ann_key] + ([] if cfg.subset else [f"zips/{s}2017.zip" for s in cfg.splits])
    _check_space_for(root, zips, known)
    for key in zips:
        _extract_once(root, key, f"{base}/{key}", known, kw)
    if any(not (root / "annotations" / f"instances_{split}2017.json").exists() for split in cfg.splits):
        _extract_once(root, ann_key, f"{base}/{ann_key}", known, kw, again=True)

    splits = {}
    for split in cfg.splits:
        ann = root / "annotations" / f"instances_{split}2017.json"
        img_dir = root / f"{split}2017"
        if not ann.exists():
            raise DownloadError(f"missing after extracting {ann_key}", where=str(ann),
                                fix="the archive is not COCO 2017's: check data.coco2017.base_url")
        if cfg.subset:
            ann = _subset(ann, root / "subsets" / f"{cfg.subset_mode}-{cfg.subset}-seed{seed}", split, cfg.subset,
                          cfg.subset_mode, seed)
            _fetch_images(base, split, ann, img_dir, **kw)
        names = _file_names(ann)  # read once: instances_train2017.json is 448 MB
        if not cfg.subset and any(not (img_dir / n).is_file() for n in names):
            key = f"zips/{split}2017.zip"
            _extract_once(root, key, f"{base}/{key}", known, kw, again=True)
        _check_images(ann, img_dir, None if cfg.subset else counts[split], names)
        splits[split] = {"images": str(img_dir), "annotations": str(ann)}
    return splits


def _extract_once(root: Path, key: str, url: str, known: dict[str, Expected], kw: dict, again: bool = False) -> None:
    """Download (when needed) and extract zip `key`, unless its marker says that was done; `again` ignores the
    marker (files it stood for are missing) and rewrites what is missing or of another size."""
    done = root / f".extracted-{Path(key).stem}.json"
    if done.exists() and not again:
        return
    if again:
        log.warning("files extracted from %s are missing: extracting it again", key)
        done.unlink(missing_ok=True)
        _check_space_for(root, [key], known, extract=False)
    archive = download_file(url, root / key, known.get(key, Expected()), **kw)
    written = safe_extract(archive, root)
    if again:
        log.info("%s: %d file(s) written again", key, written)
    write_json(done, {"archive": key})


def _check_space_for(root: Path, keys: list[str], known: dict[str, Expected], extract: bool = True) -> None:
    """Bytes still to download plus, with `extract`, room to extract (images do not compress; the annotations grow
    ~3.3x). A re-extraction writes only what is missing: safe_extract checks its own needs."""
    needed = 0
    for key in keys:
        if (root / f".extracted-{Path(key).stem}.json").exists():
            continue
        size = known.get(key, Expected()).size or 0
        final, part = root / key, root / (key + ".part")
        have = final.stat().st_size if final.exists() else (part.stat().st_size if part.exists() else 0)
        needed += max(0, size - have) + extract * size * (4 if key.startswith("annotations/") else 1)
    check_free_space(root, needed)


def _subset(ann: Path, out_dir: Path, split: str, n: int, mode: str, seed: int) -> Path:
    """A COCO JSON holding the first (or seeded-random) `n` images of `ann` and their annotations."""
    out = out_dir / f"instances_{split}2017.json"
    if out.exists():
        return out
    coco = read_coco(ann, strict=True, fix=f"delete it and {RERUN}")
    images = sorted(coco["images"], key=lambda im: im["id"])
    if mode == "random":
        pick = np.random.default_rng([seed, len(images)]).choice(len(images), size=min(n, len(images)), replace=False)
        images = [images[i] for i in sorted(pick)]
    else:
        images = images[:n]
    ids = {im["id"] for im in images}
    coco["images"] = images
    coco["annotations"] = [a for a in coco["annotations"] if a.get("image_id") in ids]
    write_json(out, coco, indent=None)
    return out


def _fetch_images(base: str, split: str, ann: Path, img_dir: Path, **kw) -> None:
    """Fetch the images `ann` lists that are not on disk whole: each is checked (complete, decodable, of the size
    the JSON gives) before it gets its name, and one already there that fails the header check is fetched again."""
    todo = []
    for im in _image_list(ann):
        dest = img_dir / im["file_name"]
        if dest.exists() and not _image_problem(dest, im, decode=False):
            continue
        dest.unlink(missing_ok=True)  # cut short by an earlier run (no Content-Length, no end marker)
        todo.append(im)
    for im in tqdm(todo, desc=f"{split}2017 images", unit="img", disable=not kw.get("progress", True)):
        url = f"{base}/{split}2017/{urllib.parse.quote(im['file_name'])}"
        download_file(url, img_dir / im["file_name"], **{**kw, "progress": False}, stamp=False,
                      max_bytes=MAX_IMAGE_BYTES, check=lambda part, im=im: _image_problem(part, im))


def _image_problem(path: Path, im: dict, decode: bool = True) -> str:
    """What is wrong with image file `path` for entry `im` ("" when nothing): its header (complete, with its end
    marker), its size against the JSON's and, with `decode`, a full decode without damaged data."""
    w, h, reason = probe(str(path))
    if reason:
        return f"is not a whole image ({reason})"
    if _is_int(im.get("width")) and _is_int(im.get("height")) and (w, h) != (im["width"], im["height"]):
        return f"is {w}x{h}, the annotations say {im['width']}x{im['height']}"
    if decode:
        from mitdet.data.transforms import decode_image  # imports albumentations: only when images are fetched
        image, why = decode_image(str(path))
        if image is None:
            return why
    return ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_images(ann: Path, img_dir: Path, expected: int | None, names: list[str] | None = None) -> None:
    names = _file_names(ann) if names is None else names
    missing = [n for n in names if not (img_dir / n).is_file()]
    if missing:
        raise DownloadError(f"{len(missing)} of the {len(names)} images listed in {ann} are missing (first: "
                            f"{missing[0]})", where=str(img_dir), fix=f"{RERUN} to resume")
    if expected is not None and len(names) != expected:
        raise DownloadError(f"lists {len(names)} images, COCO 2017 has {expected}", where=str(ann),
                            fix="the download is incomplete or not COCO 2017: check data.coco2017.base_url")
    on_disk = sum(1 for e in os.scandir(img_dir) if e.name.endswith(".jpg")) if img_dir.is_dir() else 0
    if expected is not None and on_disk != expected:
        raise DownloadError(f"holds {on_disk} .jpg files, expected {expected}", where=str(img_dir),
                            fix=f"delete the folder and {RERUN}")
    log.info("%s: %d images verified against %s", img_dir, len(names), ann.name)


def _file_names(ann: Path) -> list[str]:
    """The `file_name` of every image entry of a COCO JSON (a DataError naming the entry when one lacks it)."""
    return [im["file_name"] for im in _image_list(ann)]


def _image_list(ann: Path) -> list[dict]:
    """The image entries of a COCO JSON, each with a plain relative `file_name` (else a DataError naming it: a
    name such as `../x` would be written outside the images folder)."""
    images = read_coco(ann, fix=f"delete it and {RERUN}")["images"]
    for i, im in enumerate(images):
        name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"images[{i}] has no `file_name`", where=str(ann), fix=f"delete it and {RERUN}")
        if name.startswith(("/", "\\")) or "\0" in name or ".." in Path(name).parts:
            raise DataError(f"images[{i}] has the unsafe file_name {name!r}", where=str(ann),
                            fix="use the official annotations: check data.coco2017.base_url")
    return images
