"""build_index reads a COCO file's annotations a chunk at a time (`mitdet.data.coco_stream`): the chunks must give
exactly the parsed annotations wherever the text tempts a wrong cut, and a file they cannot follow is indexed from
whole parses, with the same result."""
from __future__ import annotations

import json

import cv2
import pytest

import mitdet.data.coco_stream as stream_mod
from mitdet.data.build_index import build_index
from mitdet.data.coco_stream import AnnotationChunks, read_for_index
from mitdet.data.sources import prepare
from mitdet.params import IndexParams
from tests.test_index import _img, _local_data
from tests.test_index_polygons import _polygons_emptied, _real_coco


def _tempting() -> dict:
    """A COCO dict whose text offers wrong places to cut or to end: objects nested in annotations, strings holding
    `},{` and `}]`, an `annotations` key inside `info` and one inside a string, RLE masks and polygons."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(1, 4)]
    annotations = []
    for k in range(60):
        a = {"id": k + 1, "image_id": k % 3 + 1, "category_id": 1, "bbox": [1.5, 2, 10 + k % 7, 12],
             "area": 100.0, "iscrowd": int(k % 10 == 0)}
        a["segmentation"] = {"counts": [1, 2, 3], "size": [48, 64]} if a["iscrowd"] else [[1, 2, 3.5, 4, k, 6]]
        if k % 3 == 0:
            a["parts"] = [{"a": 1}, {"b": [{"c": 2}]}]  # `},{` and `}]` inside an element
        if k % 4 == 1:
            a["note"] = 'a "string" with },{ and }] and "annotations":[ in it'
        annotations.append(a)
    return {"info": {"annotations": [{"x": 1}], "description": 'say "annotations": [1] here'}, "images": images,
            "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


@pytest.mark.parametrize("layout", ["compact", "indented", "annotations first", "annotations last"])
def test_chunks_give_the_parsed_annotations_wherever_a_cut_tempts(tmp_path, monkeypatch, layout):
    coco = _tempting()
    if layout == "annotations first":
        coco = {"annotations": coco["annotations"], **{k: v for k, v in coco.items() if k != "annotations"}}
    elif layout == "annotations last":
        coco = {**{k: v for k, v in coco.items() if k != "annotations"}, "annotations": coco["annotations"]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco, indent=2) if layout == "indented" else json.dumps(coco, separators=(",", ":")))
    monkeypatch.setattr(stream_mod, "CHUNK", 100)  # a cut tried every 100 bytes: inside nearly every element
    monkeypatch.setattr(stream_mod, "_SLACK", 4096)
    monkeypatch.setattr(stream_mod, "_PROBE", 128)  # the end's test sees less than the rest of the file
    parsed = []
    real_parsed = stream_mod._parsed
    monkeypatch.setattr(stream_mod, "_parsed", lambda text, stop: parsed.append(real_parsed(text, stop)) or parsed[-1])
    rest, annotations = read_for_index(path, fix="")
    assert isinstance(annotations, AnnotationChunks)
    expected = _polygons_emptied(coco)
    assert list(annotations) == expected["annotations"]
    assert rest == {**expected, "annotations": []}
    assert sum(p is not None for p in parsed) > 10 and None in parsed  # many chunks, and wrong places refused


def test_no_annotations_and_real_coco_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    for text in ('{"images":[],"annotations":[],"categories":[{"id":1,"name":"x"}]}',
                 '{"images": [], "annotations": [ \n ], "categories": [{"id": 1, "name": "x"}]}'):
        path.write_text(text)
        rest, annotations = read_for_index(path, fix="")
        assert isinstance(annotations, AnnotationChunks) and list(annotations) == [] and rest["images"] == []
    coco = _real_coco()
    path.write_text(json.dumps(coco, separators=(",", ":")))
    monkeypatch.setattr(stream_mod, "CHUNK", 5000)
    monkeypatch.setattr(stream_mod, "_SLACK", 1 << 16)
    rest, annotations = read_for_index(path, fix="")
    assert list(annotations) == _polygons_emptied(coco)["annotations"]


def test_a_file_the_chunks_cannot_follow_is_indexed_from_whole_parses(tmp_path, monkeypatch):
    """A NaN box (Python's json.dump writes it; orjson refuses it) halfway through: the chunks stop there, and
    build_index indexes everything again from whole parses, the same as when nothing is streamed."""
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), _img(48, 64))
    anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [1.5, 2, 10, 12], "area": 100.0, "iscrowd": 0,
             "segmentation": [[1, 2, 3, 4, 5, 6]]} for k in range(1, 200)]
    anns[150]["bbox"][0] = float("nan")
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
                               "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    prepare(_local_data(images, ann, images, ann), seed=0, root=tmp_path)
    monkeypatch.setattr(stream_mod, "CHUNK", 500)
    monkeypatch.setattr(stream_mod, "_SLACK", 4096)
    metrics = build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "index",
                          root=tmp_path)
    m = metrics["splits"]["train"]
    assert m["annotations"] == 199 and m["annotations_kept"] == 198
    assert m["annotations_rejected"] == {"non_finite_box": 1}
    monkeypatch.setattr(AnnotationChunks, "open", lambda path, fix: None)
    build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "whole", root=tmp_path)
    for name in ("train.jsonl", "instances_train.json", "rejected.csv"):
        assert (tmp_path / "index" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_an_end_not_found_in_time_is_read_whole(tmp_path, monkeypatch):
    """Past `_END_CANDIDATES` places that look like the annotations' end, the file is parsed whole instead."""
    coco = _tempting()
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco, separators=(",", ":")))
    monkeypatch.setattr(stream_mod, "_END_CANDIDATES", 2)  # the first annotation alone holds two `}]`
    rest, annotations = read_for_index(path, fix="")
    assert not isinstance(annotations, AnnotationChunks)
    assert {**rest, "annotations": list(annotations)} == _polygons_emptied(coco)


def test_an_array_that_ends_on_a_non_object_is_not_streamed_wrongly(tmp_path):
    """Its end is no `}]`, so the first one found lies past it (in `licenses` here): the chunks then fail to parse at
    the array's real end and say so, rather than handing out what follows as annotations."""
    path = tmp_path / "a.json"
    coco = {"images": [], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "bbox": [1, 2, 3, 4]}, {"id": 2, "bbox": [1, 2, 3, 4]}, "junk"],
            "licenses": [{"id": 1}, {"id": 2}]}
    path.write_text(json.dumps(coco, separators=(",", ":")))
    _, annotations = read_for_index(path, fix="")
    assert isinstance(annotations, AnnotationChunks)
    with pytest.raises(stream_mod.NotStreamable):
        list(annotations)
    rest, annotations = read_for_index(path, fix="", stream=False)
    assert {**rest, "annotations": list(annotations)} == coco
