"""Stage prepare_data: make data.source available and write data/raw/manifest.json.

Reads params `data` and `seed`. synthetic -> generates data/raw/synthetic/; coco2017 -> downloads into
data.coco2017.download_dir (outside DVC's cache) and points at it; local -> points at data.local.* (no copy).
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
        print(f"{split}: {n} image files in {d['images']}, annotations {d['annotations']}")
    print(f"wrote {RAW_MANIFEST} (source: {manifest['source']})")
    return 0


if __name__ == "__main__":
    stage.run(main)
