"""Every run on one page: outputs/summary.csv and a self-contained outputs/report.html.

    make report                        # or: python scripts/07_report.py

Reads each outputs/<run>/ that has eval/metrics.json (under FT_HOME when set): metrics of base, tuned and the
task's baselines, the verdict against the strongest baseline and every paired comparison with its 95% CI, the
forgetting check (general-text loss before and after), stop rates, train time, speed and peak memory, the loss curve (embedded), five side-by-side examples
and links to the run's files (common/shipping/report.py). Writes both files atomically; no run evaluated yet is an error.
"""
from __future__ import annotations

import argparse
import sys

from common.core import io, paths
from common.shipping import report


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    try:
        n = report.write()
        if n == 0:
            raise io.UserError(f"no evaluated run under {paths.home() / 'outputs'}; run make all first")
    except io.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {n} run(s) -> {paths.report_html()} and {paths.summary_csv()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
