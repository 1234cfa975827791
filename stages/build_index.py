"""Stage build_index: validate images (headers only) and annotations; write data/index/* and metrics/index.json.

Reads params `index` only; the data comes through data/raw/manifest.json (train, val and its test splits).
"""
from __future__ import annotations

from mitdet import stage
from mitdet.data.build_index import build_index
from mitdet.paths import INDEX_DIR, INDEX_METRICS, RAW_MANIFEST, REJECTED_CSV


def main(argv: list[str] | None = None) -> int:
    args = stage.parse_args(__doc__, argv)
    params = stage.load_params(args.params)
    metrics = build_index(RAW_MANIFEST, params.index, INDEX_DIR, INDEX_METRICS)
    for split, m in metrics["splits"].items():
        dropped = {**m["images_rejected"], **{f"box:{k}": v for k, v in m["annotations_rejected"].items()}}
        print(f"{split}: kept {m['images_kept']}/{m['images']} images, {m['annotations_kept']}/{m['annotations']} "
              f"annotations ({m['crowd_kept']} crowd); dropped {dropped or 'nothing'}; {m['images_per_s']} images/s")
    print(f"{metrics['categories']} categories; wrote {INDEX_DIR}/ ({REJECTED_CSV}) and {INDEX_METRICS} "
          f"in {metrics['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    stage.run(main)
