"""Clean the raw data, take a seeded sample and split, and format every example for the recipe.

    make prepare RECIPE=smollm2        # or: python scripts/01_prepare.py --recipe smollm2 [--set data.path=...]

Reads data.path (DATA_PATH in .env or the shell replaces it) in the format of the recipe's task
(common/tasks/<task>.py: AmazonTitles trn.json for product descriptions, a headline CSV for the XAU/USD forecast;
JSON lines and CSV stream, so a 2 GB trn.json never sits in memory whole). Rows the task rejects are skipped and
counted by reason with their first line numbers; a file with no usable row stops with one line saying why.

Writes (atomically) data/processed/<run>/: train.jsonl, val.jsonl, test.jsonl (prompt/completion in the form the
recipe's architecture takes: chat messages or plain text, common/model/arch.py) and, last, prepare_report.json (read,
kept, dropped by reason, split sizes, token-length percentiles, recipe, git commit, time).
"""
from __future__ import annotations

import logging
import sys

from common import tasks
from common.core import io, metadata, run
from common.data import prompts, readers
from common.model import arch, modeling

log = logging.getLogger("ft")


def token_stats(cfg, splits: dict[str, list[dict]]) -> dict:
    """Token-length percentiles per split with the recipe's tokenizer ({} when the model cannot be loaded)."""
    try:
        tok = modeling.load_tokenizer(cfg, modeling.model_source(cfg))
    except io.UserError as e:  # data preparation does not need the model; say so and go on
        log.warning("token lengths not computed: %s", e)
        return {}
    a = arch.get(cfg)
    return {name: readers.percentiles([a.length(tok, ex) for ex in rows], cfg.train.max_length)
            for name, rows in splits.items() if rows}


def body(ctx: run.Context) -> None:
    cfg, rp = ctx.cfg, ctx.paths
    task, rep = tasks.get(cfg.task), readers.Report()
    path = readers.resolve(cfg.data.path)
    parts, note = readers.split_records(cfg, task, path, rep)
    splits = {name: readers.to_examples(cfg, task, arch.get(cfg), recs, cfg.data.seed + i, extend=name != "test")
              for i, (name, recs) in enumerate(parts.items())}
    stats = token_stats(cfg, splits)
    for name, rows in splits.items():
        io.write_jsonl(rp.split(name), rows)
    if cfg.data.export_formatted:
        io.atomic_write_json(rp.data / cfg.data.export_formatted, [
            {"id": ex["id"], "prompt": ex["prompt"], "response": prompts.reference(ex)} for ex in splits["train"]])
    kept = sum(len(v) for v in parts.values())
    io.atomic_write_json(rp.prepare_report, {
        "source": str(path), "read": rep.read, "kept": kept, "dropped": dict(rep.dropped.most_common()),
        "dropped_first_lines": dict(rep.where), "splits": {k: len(v) for k, v in splits.items()},
        "split_note": note, "token_lengths": stats, "meta": metadata.describe(cfg, "prepare")})
    log.info("read %d, kept %d, dropped %s -> %s", rep.read, kept, dict(rep.dropped), rp.data)
    for name, s in stats.items():
        log.info("tokens %-5s p50=%s p90=%s max=%s over max_length=%s", name, s["p50"], s["p90"], s["max"],
                 s["over_max_length"])


def main(argv: list[str] | None = None) -> int:
    return run.main("prepare", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
