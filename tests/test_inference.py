"""Inference over a loader: an image's detections do not depend on the other images of its batch."""
from __future__ import annotations

import dataclasses
import json

import cv2
import torch

from mitdet.data.dataset import build_loader
from mitdet.data.index import load_split
from mitdet.engine.inference import predict
from mitdet.models import build_detector
from tests.train_fixtures import tiny_model, write_index

WIDTHS = (64, 100, 130)  # padded alone to 64, 128 and 160 wide: together, all to 160


def test_detections_are_the_same_at_any_batch_size(tmp_path):
    index = write_index(tmp_path, n_train=2, n_val=6, size=64)
    lines = (index / "val.jsonl").read_text().splitlines()
    records = []
    for i, line in enumerate(lines):  # give the images three widths (boxes stay inside)
        rec = json.loads(line)
        width = WIDTHS[i % 3]
        cv2.imwrite(rec["file"], cv2.resize(cv2.imread(rec["file"]), (width, 64)))
        rec["boxes"] = [[b[0] * width / 64, b[1], b[2] * width / 64, b[3]] for b in rec["boxes"]]
        records.append(json.dumps({**rec, "width": width}))
    (index / "val.jsonl").write_text("\n".join(records) + "\n")
    split = load_split(str(index), "val")
    params = dataclasses.replace(tiny_model(), max_size=160)
    torch.manual_seed(0)
    model = build_detector("mit_b0", 3, params).eval()
    model.roi_heads.score_thresh = 0.0
    labels = {c.label: c.id for c in split.categories}
    runs = []
    for batch_size in (1, 6):
        loader = build_loader(split, model=params, train=None, seed=0, training=False, batch_size=batch_size,
                              num_workers=0)
        results, stats = predict(model, loader, "cpu", labels, progress=False)
        assert stats["images"] == 6 and results
        runs.append(sorted((r["image_id"], r["category_id"], r["score"], tuple(r["bbox"])) for r in results))
    assert runs[0] == runs[1]
