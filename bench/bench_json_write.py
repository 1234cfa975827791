"""Writing a predictions file: mitdet.io.write_json (orjson) against the standard json module, interleaved.

    .venv/bin/python bench/bench_json_write.py --detections 500000 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mitdet.io import clean_json, write_json, write_text


def predictions(n: int, seed: int = 0) -> list[dict]:
    """n COCO detections shaped as the evaluate stage writes them (floats from float32 tensors)."""
    rng = np.random.default_rng(seed)
    boxes = (rng.random((n, 4), dtype=np.float32) * 500).round(2).tolist()
    scores = rng.random(n, dtype=np.float32).tolist()
    return [{"image_id": i // 100, "category_id": int(i % 80) + 1, "bbox": b, "score": s}
            for i, (b, s) in enumerate(zip(boxes, scores, strict=True))]


def standard(path: Path, value) -> None:
    """What write_json did before orjson: clean every value, then json.dumps."""
    write_text(path, json.dumps(clean_json(value), indent=None, allow_nan=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detections", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    value = predictions(args.detections)
    times = {"write_json (orjson)": [], "json module": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, fn in (("write_json (orjson)", lambda p: write_json(p, value, indent=None)),
                             ("json module", lambda p: standard(p, value))):
                t0 = time.perf_counter()
                fn(Path(tmp) / "p.json")
                times[name].append(time.perf_counter() - t0)
        write_json(Path(tmp) / "q.json", value, indent=None)  # p.json: the json module's last write
        same = json.loads((Path(tmp) / "p.json").read_text()) == json.loads((Path(tmp) / "q.json").read_text())
    for name, ts in times.items():
        print(f"{name:22s} best {min(ts):.3f} s  runs {', '.join(f'{t:.3f}' for t in ts)}")
    print(f"ratio (json module / write_json): {min(times['json module']) / min(times['write_json (orjson)']):.1f}x; "
          f"same values: {same}")


if __name__ == "__main__":
    main()
