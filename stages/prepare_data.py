"""Stage prepare_data: make data.source available and write data/raw/manifest.json.

Reads params `data` and `seed`. synthetic -> generates data/raw/synthetic/; coco2017 -> downloads into
data.coco2017.download_dir (outside DVC's cache) and points at it; local -> points at data.local.* (no copy).
"""
from __future__ import annotations

import argparse
import logging
import sys

from mitdet.data.sources import prepare
from mitdet.params import load_params_or_exit
from mitdet.paths import RAW_MANIFEST


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params_or_exit(args.params)
    manifest = prepare(params.data, params.seed)
    for split, d in manifest["splits"].items():
        n = manifest["fingerprint"][split]["images"]
        print(f"{split}: {n} image files in {d['images']}, annotations {d['annotations']}")
    print(f"wrote {RAW_MANIFEST} (source: {manifest['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
