"""Train every combination of a grid of settings as its own run and compare them by paired verdicts.

    make sweep RECIPE=smollm2 GRID="train.learning_rate=2e-4,1e-3 lora.r=8,16"   # FORCE=1: more than sweep.max_runs
    python scripts/09_sweep.py --recipe smollm2 --grid "lora.r=8,16" [--tiny] [--set k=v ...] [--force]

Without GRID the recipe's sweep.grid is used. A grid key that would change the val or test examples stops the
sweep in one line before anything trains. The grid's runs are printed and logged first; each is `make all` with
its own run name (outputs/<recipe>--<key>-<value>--.../), one after another, so a finished run is skipped and a
killed sweep, started again, makes only what is missing (common/core/sweep.py); sweep.val_size gives every run a
larger val split (test unchanged). Then writes outputs/sweeps/<run>/: sweep.csv, sweep.md and, last, sweep.json
(common/evaluation/sweep_report.py): the best run and its ties chosen on VAL (per run the val primary metric and
its paired 95% CI against the best run's), then each run's test result against the strongest baseline, the
forgetting change, train time (every resumed segment's) and peak memory, and the recommended run with its reason.
The log is sweep.log beside them.
"""
from __future__ import annotations

import logging
import sys

from common.core import config, io, paths, run, sweep
from common.evaluation import sweep_report

log = logging.getLogger("ft")


def main(argv: list[str] | None = None) -> int:
    ap = run.parser(__doc__)
    ap.add_argument("--grid", help="key=v1,v2 key=v1,v2 (replaces the recipe's sweep.grid)")
    ap.add_argument("--force", action="store_true", help="run a grid larger than sweep.max_runs")
    args = ap.parse_args(argv)
    run.setup_logging(None, args.debug)
    try:
        p = sweep.plan(args.recipe, args.sets, args.tiny, args.grid, args.force)
        run.setup_logging(paths.sweep_dir(p.name) / "sweep.log", args.debug)
        log.info("%s:", p.describe())
        for i, r in enumerate(p.runs, 1):
            log.info("  %d. %s", i, r.name)
        ran = sum(sweep.make_run(p, r, i) for i, r in enumerate(p.runs, 1))
        settings = {r.name: dict(r.setting) for r in p.runs}
        s = sweep_report.write(p.name, p.describe(), [k for k, _ in p.grid], settings,
                               p.cfgs[p.runs[0].name].eval.bootstrap)
        log.info("%d of %d runs made now; recommended: %s -> %s (make report adds it to report.html)", ran,
                 len(p.runs), s["recommended"],
                 paths.sweep_dir(p.name) / "sweep.md")
        return 0
    except (io.UserError, config.ConfigError) as e:
        if args.debug:
            raise
        print(f"error: {run.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; make sweep again goes on from here", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
