"""Helpers for the `mitdet` command tests: a tiny trained model, folders of images, the evaluate path's predictions."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.train_fixtures import tiny_model, tiny_train, write_index

B = "mit_b0"


def train_tiny_model(root: Path, epochs: int = 4) -> Path:
    """A mit_b0 detector trained 4 x 4 steps on the synthetic squares-and-discs index under `root` (seconds)."""
    from mitdet.engine.train import train

    write_index(root, n_train=8, n_val=4, size=64)
    cwd = os.getcwd()
    os.chdir(root)  # the trainer writes models/, metrics/, plots/ relative to the working directory
    try:
        train(B, tiny_train(epochs=epochs), tiny_model(), seed=0, index_dir="data/index")
    finally:
        os.chdir(cwd)
    return root / "models" / B


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`mitdet ARGV` in process: (exit code, stdout, stderr)."""
    from mitdet import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _shapes_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = (rng.random((h, w, 3)) * 60 + 40).astype(np.uint8)
    for _ in range(2):
        side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        cv2.rectangle(img, (x, y), (x + side, y + side), (40, 40, 230), -1)
    return img


def write_image_folder(folder: Path, real_photos: Path | None = None, n_real: int = 4, broken: bool = True) -> dict:
    """Generated JPEGs/PNG of several sizes (one grayscale, one in a subfolder), optionally real photos copied
    from `real_photos`, a truncated JPEG (`broken`) and a text file; returns the notable paths."""
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate([(60, 90), (120, 80), (64, 64)]):
        cv2.imwrite(str(folder / f"gen_{i}.jpg"), _shapes_image(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 92])
    cv2.imwrite(str(folder / "sub" / "nested.png"), _shapes_image(rng, 100, 150))
    gray = folder / "gray.jpg"
    cv2.imwrite(str(gray), cv2.cvtColor(_shapes_image(rng, 70, 110), cv2.COLOR_BGR2GRAY))
    paths = {"gray": gray}
    if real_photos is not None:
        for src in sorted(real_photos.glob("*.jpg"))[:n_real]:
            shutil.copy(src, folder / src.name)
    if broken:
        data = (folder / "gen_0.jpg").read_bytes()
        paths["broken"] = folder / "broken.jpg"
        paths["broken"].write_bytes(data[: len(data) // 2])  # cut: no end-of-image marker
    (folder / "notes.txt").write_text("not an image")
    return paths


def evaluate_path_results(model_dir: Path, files: list[Path], batch_size: int) -> list[dict]:
    """What the evaluate stage predicts for `files` (ids 1..N in order): its loader, then engine.inference.predict."""
    from mitdet.data.dataset import READ_FLAGS, build_loader
    from mitdet.data.index import Category, ImageRecord, SplitIndex
    from mitdet.engine.inference import predict
    from mitdet.models import load_inference_model
    from mitdet.params import model_params_from_dict

    model, spec = load_inference_model(model_dir)
    records = []
    for i, f in enumerate(files, 1):
        h, w = cv2.imread(str(f), READ_FLAGS).shape[:2]
        records.append(ImageRecord(i, str(f), w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                   np.zeros(0, np.int64), np.zeros(0, bool)))
    cats = [Category(c["id"], c["name"], c["label"]) for c in spec["categories"]]
    loader = build_loader(SplitIndex("val", records, cats), model=model_params_from_dict(spec["model"]), train=None,
                          seed=0, training=False, batch_size=batch_size, num_workers=0)
    results, _ = predict(model, loader, "cpu", {c["label"]: c["id"] for c in spec["categories"]}, amp="off",
                         progress=False)
    return results
