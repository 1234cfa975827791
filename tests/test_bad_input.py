"""Input a COCO-format dataset can hold that used to crash, hang or skew the numbers: each case is counted and
skipped, or refused with one line. Every test writes the files it needs (the real COCO photos are used when
present)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import mitdet.io as mio
from mitdet.data.dataset import DetectionDataset, build_loader
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split
from mitdet.data.sources import prepare
from mitdet.data.transforms import build_transform, decode_image
from mitdet.params import (Coco2017Params, DataParams, IndexParams, LocalParams, ModelParams, SplitPaths,
                           SyntheticParams)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "fixtures" / "coco2017-tiny50"
CATS = [{"id": 3, "name": "thing"}, {"id": 8, "name": "other"}]


# ------------------------------------------------------------------------------------------------- helpers
def _pixels(h: int, w: int, box=None, seed: int = 0) -> np.ndarray:
    """A dark noisy BGR image with a bright rectangle at `box` (xywh) when given."""
    img = np.random.default_rng(seed).integers(10, 40, (h, w, 3), dtype=np.uint8)
    if box is not None:
        x, y, bw, bh = box
        img[y:y + bh, x:x + bw] = 230
    return img


def _jpeg(h: int, w: int, box=None, seed: int = 0) -> bytes:
    return cv2.imencode(".jpg", _pixels(h, w, box, seed), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _with_size(jpeg: bytes, w: int, h: int) -> bytes:
    """`jpeg` whose frame header claims `w` x `h` (what a hostile or broken file can say)."""
    i = jpeg.find(b"\xff\xc0")
    return jpeg[:i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9:]


def _damaged(jpeg: bytes) -> bytes:
    """`jpeg` with 2000 bytes of its entropy-coded data zeroed, end marker kept: libjpeg decodes it grey."""
    sos = jpeg.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big") + 100
    return jpeg[:start] + bytes(2000) + jpeg[start + 2000:]


def _dataset(tmp: Path, files: dict[str, bytes], train: dict, val: dict | None = None) -> Path:
    """Write `files` under tmp/images and the COCO JSONs (json.dump as is: NaN stays NaN); return the manifest."""
    img_dir = tmp / "images"
    for name, data in files.items():
        (img_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (img_dir / name).write_bytes(data)
    img_dir.mkdir(exist_ok=True)
    for split, coco in (("train", train), ("val", val if val is not None else train)):
        with open(tmp / f"{split}.json", "w", encoding="utf-8") as f:
            json.dump({"categories": CATS, **coco}, f)
    manifest = {"source": "local", "splits": {s: {"images": str(img_dir), "annotations": str(tmp / f"{s}.json")}
                                              for s in ("train", "val")}}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp / "manifest.json"


def _index(manifest: Path, min_box_size: float = 2.0) -> tuple[dict, Path]:
    out = manifest.parent / "index"
    return build_index(manifest, IndexParams(min_box_size=min_box_size, workers=1), out,
                       manifest.parent / "metrics.json"), out


def _rows(out: Path, split: str = "train") -> list[dict]:
    with open(out / "rejected.csv", encoding="utf-8", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _image(image_id: int, name: str, w: int, h: int) -> dict:
    return {"id": image_id, "file_name": name, "width": w, "height": h}


def _ann(ann_id: int, image_id: int, bbox, category_id: int = 3, iscrowd: int = 0, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": extra.pop("area", bbox[2] * bbox[3] if all(map(np.isfinite, bbox)) else 0), **extra}


def _coco_stats(gt: dict, dets: list[dict], backend: str = "pycocotools") -> np.ndarray:
    """The 12 COCOeval bbox stats of `dets` against ground truth `gt` (a dict), straight from the library."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def _as_detections(gt: dict, rng=None) -> list[dict]:
    """The non-crowd boxes of `gt` as detections: exact with score 1, or (with `rng`) jittered, scored at random,
    some missing and some spurious, so that every part of the PR curve matters."""
    dets = []
    for a in gt["annotations"]:
        if a.get("iscrowd"):
            continue
        box = list(map(float, a["bbox"]))
        if rng is None:
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box, "score": 1.0})
            continue
        if rng.random() < 0.2:
            continue
        jitter = rng.normal(0, 0.15 * max(1.0, min(box[2:])), 4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                     "bbox": [box[0] + jitter[0], box[1] + jitter[1], max(0.5, box[2] + jitter[2]),
                              max(0.5, box[3] + jitter[3])]})
        if rng.random() < 0.3:
            dets.append({**dets[-1], "bbox": [box[0] + 20, box[1] + 10, box[2], box[3]], "score": float(rng.random())})
    return dets


def _restricted(coco: dict, image_ids: set) -> dict:
    return {"images": [im for im in coco["images"] if im["id"] in image_ids], "categories": coco["categories"],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}


def _finishes(fn, timeout_s: float = 20.0):
    """fn()'s result, or a test failure when it has not returned after `timeout_s` (a hang, not a slow run)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: B036 - re-raised in the test's thread
            out["error"] = err
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {timeout_s} s: it hangs"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------- 1. scores against the official ground truth
def _generated_val(tmp: Path) -> tuple[Path, Path]:
    """A val split of real JPEGs whose boxes include 1-px ones, a 1x1 one, a crowd region and boxes reaching past
    the image edge (all valid COCO); returns (manifest, the val JSON)."""
    rng = np.random.default_rng(7)
    files, images, anns = {}, [], []
    for i in range(1, 9):
        w, h = 120, 90
        files[f"{i}.jpg"] = _jpeg(h, w, seed=i)
        images.append(_image(i, f"{i}.jpg", w, h))
        for k in range(4):
            x, y = int(rng.integers(0, 80)), int(rng.integers(0, 60))
            anns.append(_ann(100 * i + k, i, [x, y, int(rng.integers(8, 40)), int(rng.integers(8, 30))],
                             category_id=CATS[k % 2]["id"]))
        anns.append(_ann(100 * i + 5, i, [5.0, 6.0, 1.0, 14.0]))         # 1 px wide
        anns.append(_ann(100 * i + 6, i, [50.5, 40.0, 12.0, 1.5]))       # 1.5 px high
        if i % 3 == 0:
            anns.append(_ann(100 * i + 7, i, [30.0, 30.0, 1.0, 1.0]))    # 1x1
            anns.append(_ann(100 * i + 8, i, [100.0, 70.0, 30.0, 30.0]))  # past the edge (kept whole by COCO)
            anns.append(_ann(100 * i + 9, i, [0, 0, 60, 40], iscrowd=1))
    val = {"images": images, "annotations": anns}
    train = {"images": images[:2], "annotations": [a for a in anns if a["image_id"] <= 2]}
    manifest = _dataset(tmp, files, train, val)
    return manifest, tmp / "val.json"


def _tiny50_val(tmp: Path) -> tuple[Path, Path]:
    if not TINY.is_dir():
        pytest.skip(f"{TINY} is absent (the shared fixtures live beside the repository in ../shared)")
    splits = {s: {"images": str(TINY / f"{s}2017"), "annotations": str(TINY / f"annotations/instances_{s}2017.json")}
              for s in ("train", "val")}
    (tmp / "manifest.json").write_text(json.dumps({"source": "local", "splits": splits}))
    return tmp / "manifest.json", TINY / "annotations/instances_val2017.json"


@pytest.mark.parametrize("data", ["generated", "tiny50"])
def test_ground_truth_scores_what_the_official_annotations_score(tmp_path, data):
    manifest, val_json = (_generated_val if data == "generated" else _tiny50_val)(tmp_path)
    metrics, out = _index(manifest, min_box_size=2.0)
    m = metrics["splits"]["val"]
    assert m["annotations_rejected"].get("box_too_small", 0) >= 1  # tiny boxes exist and are left out of training
    written = json.loads((out / "instances_val.json").read_text())
    original = _restricted(json.loads(val_json.read_text()), {im["id"] for im in written["images"]})
    assert len(written["annotations"]) == len(original["annotations"]) == m["gt_annotations"]
    assert m["gt_annotations"] == m["annotations_kept"] + m["annotations_rejected"]["box_too_small"]
    perfect = _as_detections(written)
    np.testing.assert_array_equal(_coco_stats(written, perfect), _coco_stats(original, perfect))
    assert _coco_stats(original, perfect)[0] == 1.0
    noisy = _as_detections(original, np.random.default_rng(0))
    np.testing.assert_array_equal(_coco_stats(written, noisy), _coco_stats(original, noisy))
    # training targets leave the tiny boxes out; crowd regions stay flagged
    split = load_split(out, "val")
    assert all(((r.boxes[:, 2:] - r.boxes[:, :2]) >= 2.0).all() for r in split.images)


def test_invalid_boxes_leave_both_training_and_ground_truth_and_are_listed(tmp_path):
    files = {"a.jpg": _jpeg(60, 80)}
    anns = [_ann(1, 1, [10, 10, 20, 20]), _ann(2, 1, [5, 5, 0, 10]), _ann(3, 1, [200, 200, 10, 10]),
            _ann(4, 1, [5, 5, -4, 10])]
    manifest = _dataset(tmp_path, files, {"images": [_image(1, "a.jpg", 80, 60)], "annotations": anns})
    metrics, out = _index(manifest)
    assert metrics["splits"]["train"]["annotations_rejected"] == {"box_outside_image": 1, "degenerate_box": 2}
    assert [a["source_id"] for a in json.loads((out / "instances_train.json").read_text())["annotations"]] == [1]
    assert sorted((r["ann_id"], r["reason"]) for r in _rows(out)) == [
        ("2", "degenerate_box"), ("3", "box_outside_image"), ("4", "degenerate_box")]


# ------------------------------------------------------------------------------ 2. annotation and image ids
def test_annotation_id_zero_is_renumbered_and_duplicate_ids_are_handled(tmp_path):
    files = {"a.jpg": _jpeg(60, 80), "b.jpg": _jpeg(50, 70, seed=1), "c.jpg": _jpeg(40, 40), "d.jpg": _jpeg(40, 40)}
    images = [_image(1, "a.jpg", 80, 60), _image(2, "b.jpg", 70, 50), _image(2, "b.jpg", 70, 50),  # repeated as is
              _image(3, "c.jpg", 40, 40), _image(3, "d.jpg", 40, 40)]                           # two images, one id
    anns = [_ann(0, 1, [5, 5, 20, 20]), _ann(1, 1, [40, 20, 25, 30]), _ann(7, 1, [2, 2, 1, 1]),
            _ann(5, 2, [3, 3, 10, 10]), _ann(5, 2, [3, 3, 10, 10]),   # the same annotation listed twice
            _ann(1, 2, [30, 20, 15, 15]),                             # another annotation reusing id 1
            _ann(9, 3, [1, 1, 10, 10])]                               # on the ambiguous image id
    coco = {"images": images, "annotations": anns}
    metrics, out = _index(_dataset(tmp_path, files, coco))
    m = metrics["splits"]["train"]
    assert m["images_kept"] == 2 and m["images_rejected"] == {"conflicting_image_id": 2, "duplicate_image_id": 1}
    assert m["annotations_rejected"] == {"box_too_small": 1, "duplicate_annotation": 1, "image_rejected": 1}
    assert m["annotation_ids_shared"] == 1 and any("reuse another annotation's id" in w for w in metrics["warnings"])
    gt = json.loads((out / "instances_train.json").read_text())
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4, 5]
    assert [a["source_id"] for a in gt["annotations"]] == [0, 1, 7, 5, 1]
    # the dataset's own ids stay where people look them up: the index lines and rejected.csv
    lines = {r["image_id"]: r for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())}
    assert lines[1]["ann_ids"] == [0, 1] and lines[2]["ann_ids"] == [5, 1]
    assert {(r["image_id"], r["ann_id"], r["reason"]) for r in _rows(out) if r["ann_id"]} == {
        ("1", "7", "box_too_small"), ("2", "5", "duplicate_annotation"), ("3", "9", "image_rejected")}
    assert sorted(Path(r["file"]).name for r in _rows(out) if r["reason"] == "conflicting_image_id") == ["c.jpg", "d.jpg"]
    # a perfect detection of image 1 scores 1.0 on the written ground truth with both evaluators (on the
    # original, id 0 reads as 'unmatched': 0.2525)
    one = {"images": [gt["images"][0]], "categories": gt["categories"],
           "annotations": [a for a in gt["annotations"] if a["image_id"] == 1 and a["source_id"] in (0, 1)]}
    dets = _as_detections(one)
    for backend in ("pycocotools", "faster_coco_eval"):
        assert _coco_stats(one, dets, backend)[0] == pytest.approx(1.0)
    original = {**one, "annotations": [{**a, "id": a["source_id"]} for a in one["annotations"]]}
    assert _coco_stats(original, dets)[0] == pytest.approx(0.2525, abs=1e-4)


# ---------------------------------------------------------------------- 3. crashes on input that looked valid
def test_nul_names_absurd_sizes_and_nan_boxes_are_counted_not_fatal(tmp_path):
    good = _jpeg(60, 80)
    files = {"a.jpg": good, "huge.jpg": _with_size(good, 60000, 60000), "wide.jpg": _with_size(good, 40000, 10)}
    images = [_image(1, "a.jpg", 80, 60), _image(2, "bad\0name.jpg", 80, 60), _image(3, "huge.jpg", 60000, 60000),
              _image(4, "wide.jpg", 40000, 10)]
    anns = [_ann(1, 1, [10, 10, 20, 20]), _ann(2, 1, [float("nan"), 10, 20, 20]),
            _ann(3, 1, [10, 10, float("inf"), 20]), _ann(4, 1, [30, 30, 10, 10], area=float("nan"))]
    manifest = _dataset(tmp_path, files, {"images": images, "annotations": anns})
    assert "NaN" in (tmp_path / "train.json").read_text()  # what Python's json.dump writes by default
    metrics, out = _index(manifest)
    m = metrics["splits"]["train"]
    assert m["images_kept"] == 1 and m["images_rejected"] == {"bad_file_name": 1, "image_too_large": 2}
    assert m["annotations_kept"] == 2 and m["annotations_rejected"] == {"non_finite_box": 2}
    assert "\0" not in (out / "rejected.csv").read_text() and any(r["file"] == "bad\\x00name.jpg" for r in _rows(out))
    gt = json.loads((out / "instances_train.json").read_text())
    assert [a["area"] for a in gt["annotations"]] == [400, 100]  # a NaN area is the box's


def test_the_loader_skips_what_fails_to_decode(tmp_path, monkeypatch, caplog):
    files = {f"{i}.jpg": _jpeg(60, 80, seed=i) for i in range(4)}
    images = [_image(i + 1, f"{i}.jpg", 80, 60) for i in range(4)]
    _, out = _index(_dataset(tmp_path, files, {"images": images, "annotations": []}))
    split = load_split(out, "train")
    (tmp_path / "images" / "0.jpg").write_bytes(_with_size(files["0.jpg"], 60000, 60000))  # replaced after indexing
    (tmp_path / "images" / "1.jpg").unlink()
    os.mkfifo(tmp_path / "images" / "1.jpg")  # would block a plain open() forever
    (tmp_path / "images" / "2.jpg").write_bytes(_damaged(files["2.jpg"]))
    real_imdecode = cv2.imdecode

    def imdecode(buf, flags):  # what OpenCV raises on an allocation it refuses
        if len(buf) == len(files["3.jpg"]):
            raise cv2.error("OpenCV(5.0.0) loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS")
        return real_imdecode(buf, flags)
    monkeypatch.setattr("mitdet.data.transforms.cv2.imdecode", imdecode)
    loader = build_loader(split, model=ModelParams(min_size=60, max_size=80), train=None, seed=0, training=False,
                          batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="mitdet.data.dataset"):
        images, targets, skipped = _finishes(lambda: next(iter(loader)))
    assert skipped == 4 and images == []
    text = caplog.text
    assert "image too large" in text and "not a regular file" in text and "damaged JPEG data" in text
    assert "cannot be decoded (error:" in text


# ---------------------------------------------------------------------------------------------- 4. hangs
def test_fifos_and_other_non_regular_files_never_block(tmp_path):
    files = {"a.jpg": _jpeg(60, 80)}
    manifest = _dataset(tmp_path, files, {"images": [_image(1, "a.jpg", 80, 60), _image(2, "pipe.jpg", 80, 60),
                                                     _image(3, "link.jpg", 80, 60), _image(4, "sub", 80, 60)],
                                          "annotations": [_ann(1, 2, [1, 1, 10, 10])]})
    img_dir = tmp_path / "images"
    os.mkfifo(img_dir / "pipe.jpg")
    os.mkfifo(img_dir / "stray.fifo")  # not listed: the fingerprint walk must not read it either
    (img_dir / "link.jpg").symlink_to(img_dir / "pipe.jpg")
    (img_dir / "sub").mkdir()
    from mitdet.data.sources import fingerprint
    assert _finishes(lambda: fingerprint(img_dir, tmp_path / "train.json"))["images"] == 1
    metrics, out = _finishes(lambda: _index(manifest))
    m = metrics["splits"]["train"]
    assert m["images_kept"] == 1 and m["images_rejected"] == {"not_a_regular_file": 3}
    assert {(Path(r["file"]).name, r["ann_id"], r["reason"]) for r in _rows(out)} >= {
        ("pipe.jpg", "", "not_a_regular_file"), ("pipe.jpg", "1", "image_rejected")}


# -------------------------------------------------------------------------------------- 5. silent wrong results
def test_damaged_jpeg_data_is_skipped_not_trained_on(tmp_path, capfd, caplog):
    good = _jpeg(120, 160, box=(20, 20, 60, 50))
    damaged = _damaged(good)
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV alone accepts it
    assert "Corrupt JPEG data" in capfd.readouterr().err  # and only says so on stderr
    files = {"good.jpg": good, "damaged.jpg": damaged}
    images = [_image(1, "good.jpg", 160, 120), _image(2, "damaged.jpg", 160, 120)]
    anns = [_ann(1, 1, [20, 20, 60, 50]), _ann(2, 2, [20, 20, 60, 50])]
    metrics, out = _index(_dataset(tmp_path, files, {"images": images, "annotations": anns}))
    assert metrics["splits"]["train"]["images_kept"] == 2  # headers cannot see it: the loader must
    loader = build_loader(load_split(out, "train"), model=ModelParams(min_size=120, max_size=160), train=None, seed=0,
                          training=False, batch_size=2, num_workers=1)
    images_out, targets, skipped = next(iter(loader))
    assert skipped == 1 and [t["image_id"] for t in targets] == [1]
    capfd.readouterr()
    image, why = decode_image(str(tmp_path / "images" / "damaged.jpg"))
    assert image is None and why.startswith("holds damaged JPEG data (Corrupt JPEG data")
    assert "Corrupt" not in capfd.readouterr().err  # said once, by the skip's warning, not also by libjpeg
    ds = DetectionDataset(load_split(out, "train"), build_transform(ModelParams(min_size=120, max_size=160), None, 0))
    with caplog.at_level(logging.WARNING, logger="mitdet.data.dataset"):
        assert ds[1] is None
    assert "damaged.jpg (image_id 2): the file holds damaged JPEG data" in caplog.text
    # other output written while decoding still reaches stderr
    print("a line of someone else's", file=sys.stderr, flush=True)
    assert decode_image(str(tmp_path / "images" / "good.jpg"))[1] == ""
    assert "someone else's" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------ 6. work lost or stuck
WRITER = """
import sys, time
from mitdet.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half a file")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_temporaries_of_killed_writers_are_removed_and_others_kept(tmp_path):
    target = tmp_path / "metrics.json"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    left = list(tmp_path.glob(".metrics.json.*.tmp"))
    assert len(left) == 1 and f"-{writer.pid}-" in left[0].name
    live = tmp_path / f".metrics.json.{mio._HOST}-{os.getppid()}-abcd1234.tmp"  # another process still writing
    own = tmp_path / f".metrics.json.{mio._HOST}-{os.getpid()}-efgh5678.tmp"    # another thread of this one
    other_host = tmp_path / f".metrics.json.elsewhere-{writer.pid}-ijkl9012.tmp"
    old, young = tmp_path / ".metrics.json.abcd_123.tmp", tmp_path / ".metrics.json.wxyz_789.tmp"  # older naming
    for p in (live, own, other_host, old, young):
        p.write_text("x")
    os.utime(old, (time.time() - 2 * mio.LEGACY_TEMP_AGE_S,) * 2)
    mio.write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.glob(".metrics.json.*.tmp")) == sorted(
        p.name for p in (live, own, other_host, young))


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)

    def replace(src, dst):
        synced.append("rename")
        return real_replace(src, dst)
    monkeypatch.setattr(mio.os, "fsync", fsync)
    monkeypatch.setattr(mio.os, "replace", replace)
    mio.write_text(tmp_path / "a.txt", "hello")
    assert len(synced) == 3 and synced[0].startswith(".a.txt.") and synced[1:] == ["rename", "folder"]
    assert (tmp_path / "a.txt").read_text() == "hello"


# ---------------------------------------------------------------------------------------- 7. leaks and limits
ORPHAN = """
import json, os, sys, time
from mitdet.data.dataset import build_loader
from mitdet.data.index import load_split
from mitdet.params import ModelParams

if __name__ == "__main__":
    loader = build_loader(load_split(sys.argv[1], "train"), model=ModelParams(min_size=32, max_size=64), train=None,
                          seed=0, training=False, batch_size=1, num_workers=1)
    it = iter(loader)
    next(it)
    worker = it._workers[0].pid
    forkserver = int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
    print(json.dumps([worker, forkserver]), flush=True)
    time.sleep(120)
"""


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loader_workers_exit_when_the_trainer_is_killed(tmp_path):
    _, out = _index(_dataset(tmp_path, {"a.jpg": _jpeg(40, 50)}, {"images": [_image(1, "a.jpg", 50, 40)],
                                                                    "annotations": []}))
    (tmp_path / "orphan.py").write_text(ORPHAN)
    trainer = subprocess.Popen([sys.executable, str(tmp_path / "orphan.py"), str(out)], stdout=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    try:
        pids = json.loads(trainer.stdout.readline())
    finally:
        trainer.kill()
        trainer.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(map(_gone, pids)):
        time.sleep(0.1)
    alive = [p for p in pids if not _gone(p)]
    for pid in alive:  # clean up before failing: these are this test's own processes
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"worker/forkserver {alive} outlived the trainer"


# ------------------------------------------------------------------------------------------------ 8. messages
def test_an_empty_validation_split_is_a_warning(tmp_path, caplog):
    train = {"images": [_image(1, "a.jpg", 80, 60)], "annotations": []}
    val = {"images": [_image(2, "gone.jpg", 80, 60)], "annotations": []}
    with caplog.at_level(logging.WARNING, logger="mitdet.data.index"):
        metrics, _ = _index(_dataset(tmp_path, {"a.jpg": _jpeg(60, 80)}, train, val))
    assert metrics["warnings"] == ["val: no image kept (of 1); validation and evaluation have nothing to score: "
                                   "see rejected.csv"]
    assert json.loads((tmp_path / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    assert "val: no image kept" in caplog.text


# ------------------------------------------------------------------------------------------ 9. beyond the list
def _cmyk_jpeg(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px[..., ::-1]).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _exif_rotated_jpeg(px: np.ndarray) -> bytes:
    """The stored pixels `px` with EXIF orientation 6 (viewers show them turned 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(px[..., ::-1]).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_cmyk_16bit_exif_unicode_and_linked_files_load_with_their_boxes(tmp_path):
    h, w, box = 64, 96, (20, 12, 40, 30)
    px = _pixels(h, w, box)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.jpg").write_bytes(_jpeg(h, w, box))
    files = {"cmyk.jpg": _cmyk_jpeg(px), "deep.png": cv2.imencode(".png", px.astype(np.uint16) * 257)[1].tobytes(),
             "rotated.jpg": _exif_rotated_jpeg(px), "données/画像 1.jpg": _jpeg(h, w, box)}
    names = list(files) + ["linked.jpg", "dangling.jpg", "données/manquant é.jpg"]
    images = [_image(i + 1, n, w, h) for i, n in enumerate(names)]
    anns = [_ann(10 + i, i + 1, list(box)) for i in range(len(names))]
    manifest = _dataset(tmp_path, files, {"images": images, "annotations": anns})
    (tmp_path / "images" / "linked.jpg").symlink_to(elsewhere / "real.jpg")  # out of the images root: followed
    (tmp_path / "images" / "dangling.jpg").symlink_to(elsewhere / "nothing.jpg")
    metrics, out = _index(manifest)
    m = metrics["splits"]["train"]
    assert m["images_kept"] == 5 and m["images_rejected"] == {"missing_file": 2}
    assert {Path(r["file"]).name for r in _rows(out) if not r["ann_id"]} == {"dangling.jpg", "manquant é.jpg"}
    split = load_split(out, "train")
    ds = DetectionDataset(split, build_transform(ModelParams(min_size=h, max_size=w), None, seed=0))
    for i, rec in enumerate(split.images):
        image, target = ds[i]
        assert tuple(image.shape) == (3, h, w), rec.file  # stored orientation: EXIF is not applied
        bright = (image.mean(0) * 255 > 128).nonzero()
        extent = [bright[:, 1].min().item(), bright[:, 0].min().item(), bright[:, 1].max().item() + 1,
                  bright[:, 0].max().item() + 1]
        assert target["boxes"].tolist() == [[20.0, 12.0, 60.0, 42.0]]
        np.testing.assert_allclose(extent, target["boxes"][0].tolist(), atol=1, err_msg=rec.file)
    # the whole local source path (fingerprint included) handles the same folder
    from mitdet.data.sources import fingerprint
    assert fingerprint(tmp_path / "images", tmp_path / "train.json")["images"] == 5


def test_prepare_and_index_follow_a_local_source_with_unicode_names(tmp_path):
    files = {"ünï/çödé.jpg": _jpeg(40, 50)}
    _dataset(tmp_path, files, {"images": [_image(1, "ünï/çödé.jpg", 50, 40)],
                               "annotations": [_ann(1, 1, [1, 1, 20, 20])]})
    paths = {s: SplitPaths(str(tmp_path / "images"), str(tmp_path / f"{s}.json")) for s in ("train", "val")}
    data = DataParams(source="local", synthetic=SyntheticParams(), coco2017=Coco2017Params(), local=LocalParams(**paths))
    prepare(data, seed=0, root=tmp_path)
    metrics = build_index("data/raw/manifest.json", IndexParams(), tmp_path / "index", root=tmp_path)
    assert metrics["splits"]["train"]["images_kept"] == 1
    assert load_split(tmp_path / "index", "train").images[0].file.endswith("ünï/çödé.jpg")
