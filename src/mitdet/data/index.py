"""The index build_index writes, as the other stages read it, and the COCO JSON reading they share.

`load_split` reads `<split>.jsonl` and `categories.json` into a SplitIndex of ImageRecords (boxes xyxy, labels
1..K, crowd flags, the aux image); `test_splits` names the test splits in `layout.json`. `read_coco`/`check_coco`
read a COCO instances file and check its shape, each failure a DataError naming the file and the entry: the one
shape check build_index and the scorer share. What build_index checks and writes is in `build_index.py`; this
module is what training reads, so editing the builder retrains nothing unless the index it writes changes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitdet.errors import DataError
from mitdet.io import read_json

try:  # 5-10x faster JSON for COCO-sized files
    import orjson
except ImportError:  # pragma: no cover - the plain library gives the same results, slower
    orjson = None

SPLITS = ("train", "val")
COCO_LISTS = ("images", "annotations", "categories")
REBUILD = "run `dvc repro build_index`"
REPREPARE = "run `dvc repro prepare_data`"
AUX_EXTS = (".png", ".npy")  # looked up in this order, lower case; both present is `aux_ambiguous`


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    label: int


@dataclass
class ImageRecord:
    image_id: int
    file: str
    width: int
    height: int
    boxes: np.ndarray         # float32 [N, 4] xyxy pixels (crowd regions included, flagged by iscrowd)
    labels: np.ndarray        # int64 [N], 1..K
    category_ids: np.ndarray  # int64 [N], the dataset's own ids
    iscrowd: np.ndarray       # bool [N]
    aux: str | None = None    # the aligned aux image (PNG or .npy; == file: channels 3.. of an .npy), or None


@dataclass
class SplitIndex:
    split: str
    images: list[ImageRecord]
    categories: list[Category]
    aux_channels: int = 0     # channels of each record's aux image (layout.json; 0 without one: RGB only)


# ------------------------------------------------------------------------------------------------- loading
def load_split(index_dir: str | Path, split: str, root: str | Path | None = None) -> SplitIndex:
    """Read `<index_dir>/<split>.jsonl` and `categories.json` (written by build_index).

    Image paths in the index are relative to the project root (or absolute); with `root` given, relative ones
    are joined to it, otherwise they are left relative to the working directory (the stages run from the root).
    """
    index_dir = Path(index_dir)
    path = index_dir / f"{split}.jsonl"
    for needed in (path, index_dir / "categories.json"):
        if not needed.is_file():
            raise DataError(f"no index yet (split '{split}')", where=str(needed), fix=REBUILD)
    try:
        categories = [Category(int(c["id"]), str(c["name"]), int(c["label"]))
                      for c in read_json(index_dir / "categories.json")]
    except DataError:
        raise
    except (TypeError, KeyError, ValueError) as err:
        raise DataError(f"not an index categories file ({err!r})", where=str(index_dir / "categories.json"),
                        fix=REBUILD) from None
    images = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                boxes = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"not an index line ({err!r})", where=f"{path}:{n}", fix=REBUILD) from None
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            images.append(ImageRecord(
                image_id=int(r["image_id"]), file=_rooted(r["file"], root), width=int(r["width"]),
                height=int(r["height"]), boxes=boxes, labels=np.asarray(r["labels"], np.int64),
                category_ids=np.asarray(r["category_ids"], np.int64), iscrowd=np.asarray(r["iscrowd"], bool),
                aux=_rooted(r["aux"], root) if "aux" in r else None))
    return SplitIndex(split=split, images=images, categories=categories,
                      aux_channels=int(_layout(index_dir).get("aux_channels", 0)))


def test_splits(index_dir: str | Path) -> list[str]:
    """The test split names build_index indexed (layout.json; [] for an index without one)."""
    return [str(t) for t in _layout(Path(index_dir)).get("tests", [])]


test_splits.__test__ = False  # not a test: pytest would collect it wherever a test module imports it


def _layout(index_dir: Path) -> dict:
    """layout.json ({"tests", "aux_channels"}); {} when absent (an index written by hand or by an older version)."""
    path = index_dir / "layout.json"
    if not path.is_file():
        return {}
    layout = read_json(path)
    if not isinstance(layout, dict) or not isinstance(layout.get("tests", []), list) \
            or not _is_int(layout.get("aux_channels", 0)):
        raise DataError("not an index layout file", where=str(path), fix=REBUILD)
    return layout


def _rooted(file: str, root) -> str:
    return file if root is None or os.path.isabs(file) else os.path.join(root, file)


# ----------------------------------------------------------------------------------------- COCO JSON shape
def read_coco(path: str | Path, *, strict: bool = False, fix: str = "fix or re-download the file") -> dict:
    """Read a COCO instances JSON and check its shape (`check_coco`); every failure is a DataError naming it.
    (build_index reads through `coco_stream`, which leaves the polygons and the parsed annotations out.)"""
    path = Path(path)
    if not path.is_file():
        raise DataError("COCO annotation file not found", where=str(path), fix=fix)
    return check_coco(_read_json_fast(path), str(path), strict=strict, fix=fix)


def check_coco(coco, where: str, *, strict: bool = False, fix: str | None = None) -> dict:
    """`coco` itself when it has the COCO shape, else a DataError naming `where` and the entry at fault.

    Categories always need an integer `id` and a string `name`. With `strict` (the scorer's ground truth), images
    need an integer `id` and annotations integer `image_id`/`category_id` and a 4-number `bbox`; without it,
    build_index counts and skips such entries itself.
    """
    if not isinstance(coco, dict):
        raise DataError(f"expected a COCO object with `images`, `annotations`, `categories`; got a JSON "
                        f"{_json_type(coco)}", where=where, fix=fix)
    for key in COCO_LISTS:
        if not isinstance(coco.get(key), list):
            raise DataError(f"field `{key}` is missing or not a list; this is not a COCO instances file",
                            where=where, fix=fix)
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DataError(f"categories[{i}] needs an integer `id` and a string `name`; got {_short(c)}",
                            where=where, fix=fix)
    if strict:
        for i, im in enumerate(coco["images"]):
            if not isinstance(im, dict) or not _is_int(im.get("id")):
                raise DataError(f"images[{i}] needs an integer `id`; got {_short(im)}", where=where, fix=fix)
        for i, a in enumerate(coco["annotations"]):
            if not _is_box_entry(a):
                raise DataError(f"annotations[{i}] needs integer `image_id` and `category_id` and a `bbox` of 4 "
                                f"numbers; got {_short(a)}", where=where, fix=fix)
    return coco


def _is_box_entry(a) -> bool:
    return (isinstance(a, dict) and _is_int(a.get("image_id")) and _is_int(a.get("category_id"))
            and type(a.get("bbox")) is list and len(a["bbox"]) == 4 and all(type(v) in _NUMBER for v in a["bbox"]))


def _json_type(v) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _short(v, limit: int = 80) -> str:
    """repr of an entry, cut: an error must stay one readable line."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json_fast(path: Path):
    """orjson when installed (5-10x faster on COCO-sized files), else the standard parser; malformed JSON is a
    DataError naming the file."""
    return _loads(path.read_bytes(), path)


def _loads(data: bytes, path: Path):
    # orjson refuses the NaN/Infinity that Python's json.dump writes: the standard parser then reads the file, and
    # the index rejects those boxes one by one instead of the whole file
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"not valid JSON ({err})", where=str(path)) from None


_NUMBER = (int, float)  # exact types: bool is not a number here


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
