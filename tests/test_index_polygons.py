"""build_index reads annotation JSON without parsing polygon segmentations (`mitdet.data.coco_stream`): the same
index, whatever the file holds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import pytest

import mitdet.data.coco_stream as stream_mod
from mitdet.data.build_index import build_index
from mitdet.data.coco_stream import read_boxes_only, read_for_index, without_polygons
from mitdet.data.index import read_coco
from mitdet.data.sources import prepare
from mitdet.errors import DataError
from mitdet.params import IndexParams
from tests.test_index import FIXTURES, _img, _local_data

TINY = FIXTURES / "coco2017-tiny50"


def _real_coco() -> dict:
    path = TINY / "annotations" / "instances_val2017.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared fixtures live beside the repository in ../shared)")
    return json.loads(path.read_text())


def _polygons_emptied(coco: dict) -> dict:
    """`coco` as a boxes-only read returns it: list segmentations (polygons) become [], RLE dicts stay."""
    out = json.loads(json.dumps(coco))
    for a in out["annotations"]:
        if isinstance(a.get("segmentation"), list):
            a["segmentation"] = []
    return out


@pytest.mark.parametrize("layout", ["compact", "indented"])
def test_boxes_only_read_of_real_coco_drops_only_the_polygons(tmp_path, layout):
    coco = _real_coco()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco, separators=(",", ":")) if layout == "compact" else json.dumps(coco, indent=4))
    data = path.read_bytes()
    stripped = without_polygons(data)
    assert stripped is not None and len(stripped) < len(data) / 2  # the polygons are most of the file
    got = read_boxes_only(path, fix="")
    assert got == _polygons_emptied(coco)
    crowd = [a for a in got["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) and a["segmentation"]["counts"] for a in crowd)
    rest, annotations = read_for_index(path, fix="")  # the annotations apart, read in chunks
    assert isinstance(annotations, stream_mod.AnnotationChunks)
    assert {**rest, "annotations": list(annotations)} == got
    assert read_coco(path) == coco  # the plain read (the scorer's, the download's) keeps everything


def test_build_index_outputs_are_the_same_with_and_without_parsing_polygons(tmp_path, monkeypatch):
    coco = _real_coco()
    images = TINY / "val2017"
    ann = tmp_path / "instances_val2017.json"
    ann.write_text(json.dumps(coco, separators=(",", ":")))  # the official files' compact form
    prepare(_local_data(images, ann, images, ann), seed=0, root=tmp_path)
    build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "fast", root=tmp_path)
    monkeypatch.setattr(stream_mod.AnnotationChunks, "open", lambda path, fix: None)  # one parse of the file
    monkeypatch.setattr(stream_mod, "without_polygons", lambda data: None)  # every polygon parsed, as before
    build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "whole", root=tmp_path)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fast").iterdir()) and "instances_val.json" in names
    for name in names:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    gt = json.loads((tmp_path / "fast" / "instances_val.json").read_text())
    assert len(gt["annotations"]) == len(coco["annotations"])


def _coco(annotations, images=None) -> dict:
    return {"images": images or [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def _ann(seg, **extra) -> dict:
    return {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.5, 2, 10, 12], "area": 100.0, "iscrowd": 0,
            "segmentation": seg, **extra}


def test_what_is_not_a_polygon_of_numbers_is_read_whole(tmp_path):
    path = tmp_path / "a.json"
    cases = {
        "a string inside the list": _coco([_ann([[1, 2, "x", 4]])]),
        "a segmentation key on an image entry": _coco([_ann([[1, 2, 3, 4]])], images=[
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48, "segmentation": [[1, 2, 3, 4]]}]),
        "the key inside a string": _coco([_ann([[1, 2]], note='say "segmentation": [[1, 2]] here')]),
    }
    for what, coco in cases.items():
        path.write_text(json.dumps(coco, separators=(",", ":")))
        expected = _polygons_emptied(coco) if what == "the key inside a string" else coco
        if what == "a segmentation key on an image entry":
            assert without_polygons(path.read_bytes()) is not None  # emptied, then seen on the image and re-read
        assert read_boxes_only(path, fix="") == expected, what
        rest, annotations = read_for_index(path, fix="")  # only the annotations' polygons are cut: the image's stays
        streamed = coco if what == "a string inside the list" else _polygons_emptied(coco)
        assert {**rest, "annotations": list(annotations)} == streamed, what
    assert without_polygons(b'{"annotations":[{"segmentation":{"counts":"abc","size":[2,2]}}]}') is None


def test_boxes_only_read_keeps_the_errors_and_the_nan_fallback(tmp_path):
    path = tmp_path / "a.json"
    text = json.dumps(_coco([_ann([[1, 2, 3, 4]])]), separators=(",", ":"))
    path.write_text(text[:-1])  # truncated: not JSON
    for read in (read_boxes_only, read_for_index):
        with pytest.raises(DataError, match=r"a\.json: not valid JSON"):
            read(path, fix="")
    # Python's json.dump writes NaN, which orjson refuses: the standard parser reads the whole file
    path.write_text(json.dumps(_coco([_ann([[1, 2, 3, 4]], bbox=[float("nan"), 2, 10, 12])])))
    got = read_boxes_only(path, fix="")
    assert math.isnan(got["annotations"][0]["bbox"][0]) and got["annotations"][0]["segmentation"] == [[1, 2, 3, 4]]
    _, annotations = read_for_index(path, fix="")  # found, but its chunks cannot be parsed: build_index reads again
    with pytest.raises(stream_mod.NotStreamable, match=r"a\.json: the annotations from byte \d+ on do not parse"):
        list(annotations)
    got = read_for_index(path, fix="", stream=False)[1]
    assert math.isnan(next(iter(got))["bbox"][0])


def test_build_index_counts_bad_boxes_in_a_file_with_polygons(tmp_path):
    """Rejection reasons hold in a file read without its polygons: a degenerate box, an unknown category, a good one."""
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), _img(48, 64))
    anns = [_ann([[1, 2, 3, 4, 5, 6]]), _ann([[1, 2, 3, 4]], id=2, bbox=[1, 2, 0, 5]),
            _ann([[7, 8, 9, 10]], id=3, category_id=7)]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(_coco(anns), separators=(",", ":")))
    prepare(_local_data(images, ann, images, ann), seed=0, root=tmp_path)
    metrics = build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "index",
                          root=tmp_path)
    m = metrics["splits"]["train"]
    assert m["annotations_kept"] == 1
    assert m["annotations_rejected"] == {"degenerate_box": 1, "unknown_category": 1}
    line = json.loads(Path(tmp_path / "index" / "train.jsonl").read_text())
    assert line["boxes"] == [[1.5, 2.0, 10.0, 12.0]]
