"""report: compare every backbone from metrics/ only.

Writes metrics/report.json, metrics/report.md (a markdown table for a pull request) and plots/report/ (AP against
parameters and latency with the Pareto front, per-class AP across backbones, AP per split). Absent backbones show
as missing. With test splits: report.json "by_split" and a "By split" section in report.md.
"""
from __future__ import annotations

from mitdet import stage
from mitdet.paths import REPORT_MD


def main(argv: list[str] | None = None) -> int:
    args = stage.parse_args(__doc__, argv)
    params = stage.load_params(args.params)

    from mitdet.report import build_report  # matplotlib: imported once params.yaml is known good
    build_report(list(params.backbones), params.report)
    with open(REPORT_MD, encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    stage.run(main)
