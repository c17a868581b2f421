"""Evaluate the base and the tuned model on the test split and compare them.

    make eval RECIPE=smollm2           # or: python scripts/04_eval.py --recipe smollm2

Greedy, batched generation (length-sorted batches, padding on the architecture's side, KV cache,
eval.max_new_tokens) for the base model and the tuned model (eval.use: merged, or base + adapter). Base generations
are cached in outputs/<run>/base_generations.jsonl, keyed by model, prompts and decoding settings, so re-running
eval after more training does not regenerate them.

The recipe's task scores the answers (common/tasks/<task>.py: ROUGE/BLEU/chrF for product descriptions; JSON
validity, direction accuracy, macro-F1 and magnitude MAE for the forecast, against a trivial predictor too); the
difference tuned - base on the task's per-example score gets a paired 95% bootstrap confidence interval. For both
models, stop_rate is the share of answers that ended on EOS before eval.max_new_tokens; the report warns when the
tuned model does not stop (below 90%).

Writes outputs/<run>/eval/ atomically: side_by_side.csv, improved_examples.csv, fixed_prompts.csv (when the task
has extra prompts, e.g. eval.fixed_prompts), report.md and metrics.json; then the model cards merged/README.md and
adapter/README.md (common/cards.py), whose figures are read from these files.
"""
from __future__ import annotations

import logging
import sys

from common import arch, cards, evaluation, io, modeling, prompts, run, tasks

log = logging.getLogger("ft")


def body(ctx: run.Context) -> None:
    from transformers import AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    task, a = tasks.get(cfg.task), arch.get(cfg)
    rows = io.read_jsonl(rp.split(cfg.eval.split))[: cfg.eval.num_examples]
    if not rows:
        raise io.UserError(f"{rp.split(cfg.eval.split)} has no examples; give data.test_size > 0")
    info = io.read_json(rp.adapter / "run_info.json", {})
    precision = info.get("plan", {}).get("precision", "fp32")
    tok = AutoTokenizer.from_pretrained(rp.adapter if rp.adapter.exists() else modeling.model_source(cfg))
    extra = task.extra_prompts(cfg)
    ids = [a.encode_prompt(cfg, tok, ex) for ex in rows + [a.build(cfg, fields) for _, fields in extra]]
    base, base_stops = evaluation.base_generations(cfg, rp, tok, ids, precision, a)
    tuned_stops: list[bool] = []
    tuned = modeling.generate(modeling.load_tuned(cfg, rp, cfg.eval.use), tok, ids, cfg.eval.max_new_tokens, a,
                              cfg.eval.batch_size, "tuned model", precision, tuned_stops)
    n = len(rows)
    train_refs = [prompts.reference(r) for r in io.read_jsonl(rp.split("train"))]
    m, side = evaluation.compare(cfg, task, rows, base[:n], tuned[:n], train_refs, base_stops[:n], tuned_stops[:n])
    answers = [{"prompt": label, "base": b, "tuned": t} for (label, _), b, t in zip(extra, base[n:], tuned[n:])]
    m["meta"] = evaluation.meta(cfg, rp, info)
    cards.write(cfg, rp, metrics=m)  # before metrics.json (the target): a kill in between re-runs eval
    evaluation.write(cfg, rp, m, side, answers, info)
    c = m["comparison"]
    log.info("%s base %.4f -> tuned %.4f; difference %+.4f, 95%% CI [%+.4f, %+.4f] -> %s", task.primary,
             m["base"][task.primary], m["tuned"][task.primary], c["mean"], c["ci_low"], c["ci_high"], rp.eval)


def main(argv: list[str] | None = None) -> int:
    return run.main("eval", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
