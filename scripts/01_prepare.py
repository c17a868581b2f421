"""Clean the raw data, take a seeded sample and split, and format every example for the recipe.

    make prepare RECIPE=smollm2        # or: python scripts/01_prepare.py --recipe smollm2 [--set data.path=...]

Reads data.path (DATA_PATH in .env or the shell replaces it) in the format of the recipe's task
(common/tasks/<task>.py: AmazonTitles trn.json for product descriptions, a headline CSV for the XAU/USD forecast;
JSON lines and CSV stream, so a 2 GB trn.json never sits in memory whole). Rows the task rejects are skipped and
counted by reason with their first line numbers; a file with no usable row stops with one line saying why. A
causal recipe's example that its chat template cannot render, or that keeps no trained token within
train.max_length, is dropped and counted too (never trained all-masked); the share of train tokens trained is logged.
The chat and preference tasks also read a dataset folder or `hub:owner/name` (common/tasks/chat.py). How records
are split, built into rows and checked for trained tokens is the task's (common/tasks/__init__.py: the preference
task splits by prompt and checks both answers of a pair). data.val_extra adds records the
sample left out to val, and data.replay mixes general text into train (common/data/splits.py); test is unchanged.

Writes (atomically) data/processed/<run>/: train.jsonl, val.jsonl, test.jsonl (prompt/completion in the form the
recipe's architecture takes: chat messages or plain text, common/model/arch.py) and, last, prepare_report.json (read,
kept, dropped by reason, repaired by kind, split sizes, trained-token share, token-length percentiles, recipe, git commit, time).
"""
from __future__ import annotations

import logging
import sys

from common import tasks
from common.core import io, metadata, run
from common.data import prompts, readers, splits
from common.model import arch, modeling

log = logging.getLogger("ft")


def tokenizer(cfg):
    """The recipe's tokenizer, or None when the model cannot be loaded (token_stats says why)."""
    try:
        return modeling.load_tokenizer(cfg, modeling.model_source(cfg))
    except io.UserError:
        return None


def token_stats(cfg, task, parts: dict[str, list[dict]]) -> dict:
    """Token-length percentiles per split with the recipe's tokenizer ({} when the model cannot be loaded)."""
    try:
        tok = modeling.load_tokenizer(cfg, modeling.model_source(cfg))
    except io.UserError as e:  # data preparation does not need the model; say so and go on
        log.warning("token lengths not computed: %s", e)
        return {}
    a = arch.get(cfg)
    return {name: readers.percentiles([n for ex in rows for n in task.lengths(a, tok, ex)], cfg.train.max_length)
            for name, rows in parts.items() if rows}


def trained_only(cfg, task, parts: dict[str, list[dict]], rep: readers.Report) -> float | None:
    """Drop (and count) each example the chat template cannot render or that keeps no trained token within
    train.max_length (test: its last answer, the one evaluated); the share of train tokens trained (None without a
    tokenizer)."""
    try:
        tok = modeling.load_tokenizer(cfg, modeling.model_source(cfg))
    except io.UserError:  # token_stats says why
        return None
    a = arch.get(cfg)
    trained = total = 0
    for name, rows in parts.items():
        keep = []
        for ex in rows:
            why, n_trained, n_all = task.trained_tokens(cfg, a, tok, ex, last_only=name == "test")
            if why:
                rep.drop(why, ex["id"])
                continue
            keep.append(ex)
            if name == "train":
                trained, total = trained + n_trained, total + n_all
        parts[name] = keep
    if not parts["train"]:
        raise io.UserError(f"no training example keeps a trained token within train.max_length="
                           f"{cfg.train.max_length} (dropped: {dict(rep.dropped.most_common(2))}); raise "
                           "train.max_length or check prompt.template")
    share = trained / max(1, total)
    log.info("trained tokens: %.1f%% of %d train tokens (loss on %s)", 100 * share, total, cfg.train.loss_on)
    return share


def body(ctx: run.Context) -> None:
    cfg, rp = ctx.cfg, ctx.paths
    task, rep = tasks.get(cfg.task), readers.Report()
    path = task.source(cfg.data.path) or readers.resolve(cfg.data.path)
    parts, note = task.split(cfg, path, rep)
    extra, extra_note = task.extra_val(cfg, path, parts)
    if extra_note:
        log.warning(extra_note)
    parts["val"] = parts["val"] + extra
    out = {name: task.examples(cfg, arch.get(cfg), recs, cfg.data.seed + i, extend=name != "test")
           for i, (name, recs) in enumerate(parts.items())}
    share = trained_only(cfg, task, out, rep)
    out["train"], replay = splits.add_replay(cfg, arch.get(cfg), tokenizer(cfg), out["train"])
    if replay:
        log.info("replay: %d general-text examples (%s) are %.1f%% of %d train examples", replay["examples"],
                 replay["file"], 100 * replay["examples"] / len(out["train"]), len(out["train"]))
    stats = token_stats(cfg, task, out)
    for name, rows in out.items():
        io.write_jsonl(rp.split(name), rows)
    if cfg.data.export_formatted:
        io.atomic_write_json(rp.data / cfg.data.export_formatted, [
            {"id": ex["id"], "prompt": ex["prompt"], "response": prompts.reference(ex)} for ex in out["train"]])
    kept = sum(len(v) for v in out.values()) - replay.get("examples", 0)  # records of the data file
    io.atomic_write_json(rp.prepare_report, {
        "source": str(path), "read": rep.read, "kept": kept, "dropped": dict(rep.dropped.most_common()),
        "dropped_first_lines": dict(rep.where), "repaired": dict(rep.repaired.most_common()),
        "repaired_first_lines": dict(rep.repaired_where), "splits": {k: len(v) for k, v in out.items()},
        "split_note": "; ".join(filter(None, [note, extra_note])) or None, "val_extra": len(extra), "replay": replay,
        "trained_token_share": share, "token_lengths": stats, "meta": metadata.describe(cfg, "prepare")})
    log.info("read %d, kept %d, dropped %s -> %s", rep.read, kept, dict(rep.dropped), rp.data)
    for name, s in stats.items():
        log.info("tokens %-5s p50=%s p90=%s max=%s over max_length=%s", name, s["p50"], s["p90"], s["max"],
                 s["over_max_length"])


def main(argv: list[str] | None = None) -> int:
    return run.main("prepare", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
