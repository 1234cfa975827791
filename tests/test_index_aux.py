"""Aux images in build_index (index.aux_channels), test splits, and local COCO sources with aux folders."""
from __future__ import annotations

import csv
import dataclasses
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import mitdet.data.sources as sources
from mitdet.data.headers import probe, read_header
from mitdet.data.build_index import build_index
from mitdet.data.index import load_split, test_splits
from mitdet.errors import DataError
from mitdet.params import IndexParams, LocalParams, SplitPaths, load_params

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
RGB_KEYS = ["image_id", "file", "width", "height", "boxes", "category_ids", "labels", "iscrowd", "ann_ids"]


def _px(h, w, c=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, c) if c else (h, w)).astype(dtype)


def _png(w: int, h: int, bits: int, colour: int) -> bytes:
    """A PNG of the given bit depth and colour type, written by hand (OpenCV writes no palette or gray+alpha)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    per_px = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * max(bits, 8) // 8
    raw = b"".join(b"\0" + bytes(w * per_px) for _ in range(h))
    plte = chunk(b"PLTE", bytes(3)) if colour == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour, 0, 0, 0)) + plte
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_headers_read_npy_and_aux_channels(tmp_path):
    cases = {  # name -> (array, probe's answer as a main image, read_header's (channels, bits))
        "rgbte.npy": (_px(30, 50, 5), (50, 30, ""), (5, 8)),
        "fortran.npy": (np.asfortranarray(_px(30, 50, 4)), (50, 30, ""), (4, 8)),
        "gray16.npy": (_px(30, 50, 0, np.uint16), (0, 0, "unsupported_array"), (1, 16)),
        "two.npy": (_px(30, 50, 2), (0, 0, "channels_mismatch"), (2, 8)),
        "rgb16.npy": (_px(30, 50, 3, np.uint16), (0, 0, "unsupported_array"), (3, 16)),
        "float.npy": (_px(30, 50, 3, np.float32), (0, 0, "unsupported_array"), None),
        "flat.npy": (np.zeros(7, np.uint8), (0, 0, "unsupported_array"), None),
        "object.npy": (np.array([1, "a"], dtype=object), (0, 0, "unsupported_array"), None),
    }
    for name, (array, expected, aux) in cases.items():
        np.save(tmp_path / name, array, allow_pickle=True)
        assert probe(str(tmp_path / name)) == expected, name
        hd = read_header(str(tmp_path / name))
        assert ((hd.channels, hd.bits) if not hd.reason else None) == aux, name
    (tmp_path / "cut.npy").write_bytes((tmp_path / "rgbte.npy").read_bytes()[:-1])
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}\n")
    assert probe(str(tmp_path / "cut.npy"))[2] == "truncated" and probe(str(tmp_path / "garbage.npy"))[2] == "bad_header"
    pngs = {"g8.png": (_px(9, 7, 0), 1, 8), "g16.png": (_px(9, 7, 0, np.uint16), 1, 16),
            "rgb.png": (_px(9, 7), 3, 8), "rgba16.png": (_px(9, 7, 4, np.uint16), 4, 16)}
    for name, (array, channels, bits) in pngs.items():
        cv2.imwrite(str(tmp_path / name), array)
        hd = read_header(str(tmp_path / name))
        assert (hd.width, hd.height, hd.channels, hd.bits, hd.kind) == (7, 9, channels, bits, "png"), name
    for (bits, colour), channels in {(8, 3): 3, (8, 4): 2, (16, 4): 2, (4, 0): 1}.items():
        (tmp_path / "hand.png").write_bytes(_png(7, 9, bits, colour))
        hd = read_header(str(tmp_path / "hand.png"))
        assert (hd.width, hd.height, hd.channels, hd.bits) == (7, 9, channels, 8 if colour == 3 else bits)
    cv2.imwrite(str(tmp_path / "gray.jpg"), _px(9, 7, 0))
    assert read_header(str(tmp_path / "gray.jpg")).channels == 1


def _coco(tmp_path: Path, split: str, images: dict[str, tuple[int, int]]) -> Path:
    """instances_<split>.json: one 10x10 box on each image (file name -> (width, height))."""
    ims = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(images.items(), 1)]
    anns = [{"id": 100 + im["id"], "image_id": im["id"], "category_id": 3, "bbox": [2, 2, 10, 10]} for im in ims]
    path = tmp_path / f"instances_{split}.json"
    path.write_text(json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}))
    return path


def _local(train: SplitPaths, val: SplitPaths, tests: dict | None = None):
    data = load_params(ROOT / "params.yaml").data
    return dataclasses.replace(data, source="local", local=LocalParams(train=train, val=val, tests=tests or {}))


AUX_CASES = {  # image file name -> (what is written in aux/, the image's rejection reason or "" when kept)
    "ok16.jpg": ({"ok16.png": _px(40, 60, 0, np.uint16)}, ""),
    "ok8.png": ({"ok8.png": _px(40, 60, 0)}, ""),
    "oknpy.jpg": ({"oknpy.npy": _px(40, 60, 0, np.uint16)}, ""),
    "okhwc.jpg": ({"okhwc.npy": _px(40, 60, 1)}, ""),
    "sub/deep.jpg": ({"sub/deep.png": _px(40, 60, 0)}, ""),
    "missing.jpg": ({}, "aux_missing"),
    "other_stem.jpg": ({"other_stem_x.png": _px(40, 60, 0)}, "aux_missing"),
    "both.jpg": ({"both.png": _px(40, 60, 0), "both.npy": _px(40, 60, 0)}, "aux_ambiguous"),
    "small.jpg": ({"small.png": _px(40, 59, 0)}, "aux_size_mismatch"),
    "three.jpg": ({"three.png": _px(40, 60)}, "aux_channels_mismatch"),
    "npy3.jpg": ({"npy3.npy": _px(40, 60, 2)}, "aux_channels_mismatch"),
    "cut.jpg": ({"cut.png": "cut"}, "aux_bad_header"),
    "text.jpg": ({"text.png": "text"}, "aux_bad_header"),
    "float.jpg": ({"float.npy": _px(40, 60, 0, np.float32)}, "aux_bad_header"),
    "bad_main.jpg": ({"bad_main.png": _px(40, 60, 0)}, "truncated"),  # the image's own reason comes first
}


def _aux_dataset(tmp_path: Path):
    """Train: every AUX_CASES image with its aux folder; val: .npy images without one; test 'night' with one."""
    for name, (aux_files, _) in AUX_CASES.items():
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "img" / name), _px(40, 60))
        for aux_name, content in aux_files.items():
            path = tmp_path / "aux" / aux_name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                ok = cv2.imencode(".png", _px(40, 60, 0))[1].tobytes()
                path.write_bytes(ok[:-20] if content == "cut" else b"not a png at all")
            elif aux_name.endswith(".npy"):
                np.save(path, content)
            else:
                cv2.imwrite(str(path), content)
    whole = (tmp_path / "img" / "bad_main.jpg").read_bytes()
    (tmp_path / "img" / "bad_main.jpg").write_bytes(whole[:-50])
    train = _coco(tmp_path, "train", {n: (60, 40) for n in AUX_CASES})
    val_cases = {"v4.npy": 4, "v5.npy": 5, "v2.npy": 2, "v.jpg": 0}  # channels; 0: an ordinary JPEG
    for name, c in val_cases.items():
        (tmp_path / "val").mkdir(exist_ok=True)
        np.save(tmp_path / "val" / name, _px(40, 60, c)) if c else cv2.imwrite(str(tmp_path / "val" / name), _px(40, 60))
    val = _coco(tmp_path, "val", {n: (60, 40) for n in val_cases})
    night = _coco(tmp_path, "night", {"ok16.jpg": (60, 40), "missing.jpg": (60, 40)})
    return _local(SplitPaths("img", train.name, "aux"), SplitPaths("val", val.name),
                  {"night": SplitPaths("img", night.name, "aux")})


@pytest.mark.parametrize("workers", [1, 2])
def test_aux_images_every_rejection_reason(tmp_path, workers, monkeypatch):
    import mitdet.data.build_index as index_mod
    monkeypatch.setattr(index_mod, "INLINE_BELOW", 0)  # the process pool on a small set
    manifest = sources.prepare(_aux_dataset(tmp_path), seed=0, root=tmp_path)
    assert manifest["tests"] == ["night"] and manifest["splits"]["night"]["aux"] == "aux"
    assert "aux" not in manifest["splits"]["val"] and manifest["fingerprint"]["train"]["aux"] == 15
    metrics = build_index("data/raw/manifest.json", IndexParams(aux_channels=1, workers=workers), tmp_path / "index",
                          root=tmp_path)
    m = metrics["splits"]["train"]
    expected = {}
    for _, reason in AUX_CASES.values():
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert m["images_rejected"] == dict(sorted(expected.items())) and m["images_kept"] == 5
    assert m["annotations_rejected"] == {"image_rejected": 10} and metrics["aux_channels"] == 1
    rows = [r for r in csv.DictReader(open(tmp_path / "index" / "rejected.csv")) if r["ann_id"] == ""]
    assert {(Path(r["file"]).name, r["reason"]) for r in rows if r["split"] == "train"} == {
        (Path(n).name, reason) for n, (_, reason) in AUX_CASES.items() if reason}
    train = load_split(tmp_path / "index", "train", root=tmp_path)
    assert train.aux_channels == 1
    assert {Path(r.file).name: r.aux for r in train.images} == {
        "ok16.jpg": str(tmp_path / "aux/ok16.png"), "ok8.png": str(tmp_path / "aux/ok8.png"),
        "oknpy.jpg": str(tmp_path / "aux/oknpy.npy"), "okhwc.jpg": str(tmp_path / "aux/okhwc.npy"),
        "deep.jpg": str(tmp_path / "aux/sub/deep.png")}
    # without an aux folder: channels 3.. of an .npy of 3 + N channels, else rejected
    val = metrics["splits"]["val"]
    assert val["images_kept"] == 1 and val["images_rejected"] == {"aux_missing": 1, "channels_mismatch": 2}
    (rec,) = load_split(tmp_path / "index", "val").images
    assert rec.file == rec.aux == "val/v4.npy"
    assert metrics["splits"]["night"]["images_kept"] == 1 and test_splits(tmp_path / "index") == ["night"]
    assert json.loads((tmp_path / "index" / "layout.json").read_text()) == {"tests": ["night"], "aux_channels": 1}
    night_gt = json.loads((tmp_path / "index" / "instances_night.json").read_text())
    assert [im["file_name"] for im in night_gt["images"]] == ["ok16.jpg"] and len(night_gt["annotations"]) == 1


def test_rgb_default_ignores_aux_and_keeps_the_line_format(tmp_path):
    """index.aux_channels 0: no aux key, the exact RGB line, an .npy of >= 3 channels read as RGB."""
    manifest = sources.prepare(_aux_dataset(tmp_path), seed=0, root=tmp_path)
    metrics = build_index("data/raw/manifest.json", IndexParams(), tmp_path / "index", root=tmp_path)
    assert "aux_channels" not in metrics and set(metrics["splits"]) == {"train", "val", "night"}
    assert metrics["splits"]["train"]["images_rejected"] == {"truncated": 1}  # aux files are not looked at
    assert metrics["splits"]["val"]["images_rejected"] == {"channels_mismatch": 1}  # the 2-channel array
    line = (tmp_path / "index" / "train.jsonl").read_text().splitlines()[0]
    assert line == ('{"image_id":1,"file":"img/ok16.jpg","width":60,"height":40,"boxes":[[2.0,2.0,10.0,10.0]],'
                    '"category_ids":[3],"labels":[1],"iscrowd":[0],"ann_ids":[101]}')
    for split in ("train", "val", "night"):
        lines = [json.loads(t) for t in (tmp_path / "index" / f"{split}.jsonl").read_text().splitlines()]
        assert lines and all(list(r) == RGB_KEYS for r in lines)
        assert all(r.aux is None for r in load_split(tmp_path / "index", split).images)
    assert load_split(tmp_path / "index", "train").aux_channels == 0
    assert json.loads((tmp_path / "index" / "source.json").read_text()) == {
        "source": "local", "fingerprint": manifest["fingerprint"]}
    (tmp_path / "index" / "layout.json").unlink()  # an index from before layout.json: RGB, no test split
    assert load_split(tmp_path / "index", "train").aux_channels == 0 and test_splits(tmp_path / "index") == []


def test_local_aux_folder_in_manifest_and_fingerprint(tmp_path, monkeypatch):
    data = _aux_dataset(tmp_path)
    first = sources.prepare(data, seed=0, root=tmp_path)["fingerprint"]
    assert set(first["train"]) == {"annotations_sha256", "images", "images_bytes", "images_sha256", "images_hashed_by",
                                   "aux", "aux_bytes", "aux_sha256", "aux_hashed_by"}
    assert set(first["val"]) == {"annotations_sha256", "images", "images_bytes", "images_sha256", "images_hashed_by"}
    cv2.imwrite(str(tmp_path / "aux" / "ok8.png"), _px(40, 60, 0, seed=1))  # same size, other pixels
    second = sources.prepare(data, seed=0, root=tmp_path)["fingerprint"]
    assert second["train"]["aux_sha256"] != first["train"]["aux_sha256"]
    assert second["train"]["images_sha256"] == first["train"]["images_sha256"]
    broken = dataclasses.replace(data, local=dataclasses.replace(
        data.local, tests={"night": SplitPaths("img", "instances_night.json", "no_such_aux")}))
    with pytest.raises(DataError, match=r"data\.local\.tests\.night\.aux = .*no_such_aux: not found"):
        sources.prepare(broken, seed=0, root=tmp_path)

    # synthetic: an `aux` folder the generator returns goes into the manifest and its fingerprint
    def fake_generate(out, params, seed):
        split = {}
        for s in ("train", "val"):
            (out / s).mkdir(parents=True)
            (out / f"{s}_aux").mkdir()
            cv2.imwrite(str(out / s / "1.jpg"), _px(20, 30))
            cv2.imwrite(str(out / f"{s}_aux" / "1.png"), _px(20, 30, 0, np.uint16))
            _coco(out, s, {"1.jpg": (30, 20)})
            split[s] = {"images": str(out / s), "annotations": str(out / f"instances_{s}.json"),
                        "aux": str(out / f"{s}_aux")}
        return split
    monkeypatch.setattr(sources, "generate", fake_generate)
    manifest = sources.prepare(dataclasses.replace(data, source="synthetic"), seed=0, root=tmp_path)
    assert manifest["splits"]["val"]["aux"] == "data/raw/synthetic/val_aux" and manifest["tests"] == []
    assert manifest["fingerprint"]["val"]["aux"] == 1
    metrics = build_index("data/raw/manifest.json", IndexParams(aux_channels=1), tmp_path / "index", root=tmp_path)
    assert metrics["splits"]["val"]["images_kept"] == 1
    assert load_split(tmp_path / "index", "val").images[0].aux == "data/raw/synthetic/val_aux/1.png"


@pytest.mark.parametrize("name", ["coco2017-tiny50", "coco128"])
def test_real_coco_fixture_with_generated_aux(tmp_path, name, monkeypatch):
    """Real COCO photos with generated 16-bit aux PNGs: the right size kept, a wrong size or none rejected."""
    fx = FIXTURES / name
    if not fx.is_dir():
        pytest.skip(f"{fx} is absent (the shared fixtures live beside the repository in ../shared)")
    import mitdet.data.build_index as index_mod
    monkeypatch.setattr(index_mod, "INLINE_BELOW", 0)
    images, ann = fx / "train2017", fx / "annotations" / "instances_train2017.json"
    coco = json.loads(ann.read_text())
    (tmp_path / "aux").mkdir()
    wrong, missing = set(), set()
    for k, im in enumerate(sorted(coco["images"], key=lambda im: im["id"])):
        if k % 10 == 3:
            missing.add(im["id"])
            continue
        w = im["width"] - (k % 10 == 7)
        if w != im["width"]:
            wrong.add(im["id"])
        stem = Path(im["file_name"]).stem
        cv2.imwrite(str(tmp_path / "aux" / f"{stem}.png"), np.zeros((im["height"], w), np.uint16))
    data = _local(SplitPaths(str(images), str(ann), "aux"), SplitPaths(str(images), str(ann)))
    sources.prepare(data, seed=0, root=tmp_path)
    metrics = build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=2, aux_channels=1),
                          tmp_path / "index", root=tmp_path)
    m = metrics["splits"]["train"]
    assert m["images_rejected"] == {"aux_missing": len(missing), "aux_size_mismatch": len(wrong)}
    assert m["images_kept"] == len(coco["images"]) - len(missing) - len(wrong)
    assert m["annotations_kept"] + sum(m["annotations_rejected"].values()) == len(coco["annotations"])
    assert metrics["splits"]["val"]["images_rejected"] == {"aux_missing": len(coco["images"])}  # no aux folder
    kept = load_split(tmp_path / "index", "train", root=tmp_path)
    assert all(Path(r.aux).stem == Path(r.file).stem and r.image_id not in missing | wrong for r in kept.images)
