"""report: compare every backbone from metrics/ only.

Writes metrics/report.json, metrics/report.md (a markdown table for a pull request) and plots/report/ (AP against
parameters and latency with the Pareto front, per-class AP across backbones). Absent backbones show as missing.
"""
from __future__ import annotations

import argparse
import sys

from mitdet.params import load_params_or_exit
from mitdet.paths import REPORT_MD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    from mitdet.report import build_report
    build_report(list(params.backbones), params.report)
    with open(REPORT_MD, encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
