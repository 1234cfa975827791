"""Stage prepare_data: make data.source available and write data/raw/manifest.json.

Reads params `data` and `seed`. synthetic -> generates data/raw/synthetic/; coco2017 -> downloads into
data.coco2017.download_dir (outside DVC's cache) and points at it; local -> points at data.local.* (no copy);
yolo -> converts data.yolo's label folders into data/raw/yolo/annotations/ (COCO JSON) and points at its images.
"""
from __future__ import annotations

from mitdet import stage
from mitdet.data.sources import prepare
from mitdet.paths import RAW_MANIFEST


def main(argv: list[str] | None = None) -> int:
    args = stage.parse_args(__doc__, argv)
    stage.setup_logging()
    params = stage.load_params(args.params)
    manifest = prepare(params.data, params.seed)
    for split, d in manifest["splits"].items():
        n = manifest["fingerprint"][split]["images"]
        aux = f", aux {d['aux']}" if "aux" in d else ""
        print(f"{split}: {n} image files in {d['images']}, annotations {d['annotations']}{aux}")
    print(f"wrote {RAW_MANIFEST} (source: {manifest['source']})")
    return 0


if __name__ == "__main__":
    stage.run(main)
