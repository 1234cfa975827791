"""build_index rounds the boxes it keeps in bulk (`round_boxes`): every value must be what `round(v, 3)` gives,
ties and huge values included, and the index must be byte-identical to rounding value by value."""
from __future__ import annotations

import json
from array import array

import numpy as np

import mitdet.data.build_index as index_mod
from mitdet.data.build_index import build_index, round_boxes
from mitdet.data.sources import prepare
from mitdet.params import IndexParams
from tests.test_index import _local_data
from tests.test_index_polygons import TINY, _real_coco


def _values() -> list[float]:
    rng = np.random.default_rng(0)
    decimals = rng.integers(0, 2_000_000, 40_000) / 10_000  # 4 decimals: every fourth one a decimal tie
    return [*rng.uniform(0, 2000, 40_000).tolist(),  # what float boxes are
            *decimals.tolist(),
            *(decimals + 5e-5).tolist(), *(decimals - 5e-5).tolist(),  # the ties' neighbourhoods
            *(np.arange(0, 4000) / 8000).tolist(),  # exact binary halves of the third decimal (0.0625, ...)
            *(rng.integers(0, 5000, 1000) + 0.0005).tolist(),
            *np.nextafter(decimals, np.inf).tolist(), *np.nextafter(decimals, -np.inf).tolist(),
            *rng.uniform(1e5, 1e13, 2000).tolist(), 1e300, 2.0 ** 60 + 0.5, 0.0, 5e-324, 1234.5675, 0.0005, 0.0015]


def test_round_boxes_is_round_to_the_bit():
    values = _values()
    expected = [round(v, 3) for v in values]
    boxes = array("d", values)
    round_boxes(boxes, chunk=1000)  # several chunks and a partial last one
    assert [v.hex() for v in boxes] == [v.hex() for v in expected]
    empty = array("d")
    round_boxes(empty)  # nothing to do
    assert len(empty) == 0


def test_index_is_the_same_as_rounding_value_by_value(tmp_path, monkeypatch):
    """On the real COCO fixtures, with boxes made awkward (4-6 decimals, beyond the image), against `round`."""
    coco = _real_coco()
    rng = np.random.default_rng(1)
    for a in coco["annotations"]:
        a["bbox"] = [round(v + float(rng.uniform(-0.001, 0.001)), int(rng.integers(4, 7))) for v in a["bbox"]]
    coco["annotations"][0]["bbox"][0] = -3.25  # clipped
    images = TINY / "val2017"
    ann = tmp_path / "instances_val2017.json"
    ann.write_text(json.dumps(coco))
    prepare(_local_data(images, ann, images, ann), seed=0, root=tmp_path)
    build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "bulk", root=tmp_path)

    def one_by_one(values, ndigits=3):
        for i, v in enumerate(values):
            values[i] = round(v, ndigits)
    monkeypatch.setattr(index_mod, "round_boxes", one_by_one)
    build_index("data/raw/manifest.json", IndexParams(min_box_size=0.0, workers=1), tmp_path / "each", root=tmp_path)
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert "val.jsonl" in names and names == sorted(p.name for p in (tmp_path / "bulk").iterdir())
    for name in names:
        assert (tmp_path / "bulk" / name).read_bytes() == (tmp_path / "each" / name).read_bytes(), name
    boxes = [b for line in (tmp_path / "bulk" / "val.jsonl").read_text().splitlines() for b in json.loads(line)["boxes"]]
    assert len(boxes) > 100 and any(v != round(v, 2) for box in boxes for v in box)  # three decimals were kept
