"""Evaluate the base and the tuned model on the test split and compare them.

    make eval RECIPE=smollm2           # or: python scripts/04_eval.py --recipe smollm2

Greedy, batched generation (length-sorted batches, padding on the architecture's side, KV cache,
eval.max_new_tokens) for the base model and the tuned model (eval.use: merged, or base + adapter). The base model
is loaded from the weights the tuned model is built on (for a pre-quantized recipe: the full-precision copy the
adapter is merged into, or put on with eval.use=adapter). Each model's answers are cached (outputs/<run>/
base_generations.jsonl, tuned_generations.jsonl), keyed by its weights, the prompts and the decoding settings, so
re-running eval after more training keeps the base answers and a card-only change regenerates nothing.

The recipe's task scores the answers (common/tasks/<task>.py) and declares its simple baselines (the majority
forecast and a sentiment rule; a retrieval answer and the title itself), scored like a model. Tuned vs base and
tuned vs each baseline get a paired 95% bootstrap CI on the task's per-example score. The strongest baseline is
chosen on the val split; the headline verdict is against the strongest alternative (that baseline or the base
model, whichever scores higher on test): better, worse or not distinguishable, with roughly how many test examples
would resolve a difference of the observed size, or "too few examples to tell" below 30 paired examples (or 6
that differ; common/evaluation/metrics.py says why). The forgetting check scores base and tuned on the general-text
set data/general/passages.txt (common/evaluation/forgetting.py), paired over passages; a task with held_out_loss
(chat) gets the same comparison on the eval rows' reference answers (loss per token, base vs tuned, paired CI).
stop_rate is the share of answers that ended on EOS before eval.max_new_tokens; the report warns when the tuned
model does not stop (below 90%).

A task with pairs (task preference: prompt, chosen, rejected) also scores each held-out pair's two answers under the
base (the starting model) and the tuned model, cached with the answers: preference accuracy (the share of pairs
whose chosen answer gets the higher log-probability, summed and per token) of both, paired with a CI and verdict,
beside the `longer` baseline, and the mean DPO reward margin (common/evaluation/preference.py); the task's ROUGE-L
is against the chosen answer.

The tuned model also answers the val split (not the base model: its answers are shared by a sweep's runs); its
per-example val scores (val_scores.csv) are what make sweep chooses its best run on, so test picks nothing.

Writes outputs/<run>/eval/ atomically: side_by_side.csv, val_scores.csv, improved_examples.csv, fixed_prompts.csv
(when the task has extra prompts, e.g. eval.fixed_prompts), preference_pairs.csv (a task with pairs), report.md and
metrics.json; then the model cards merged/README.md and adapter/README.md (common/shipping/cards.py), whose figures
are read from these files.
docs/evaluation.md explains how to read the verdicts.
"""
from __future__ import annotations

import logging
import sys

from common import tasks
from common.core import io, run
from common.data import prompts
from common.evaluation import compare, forgetting, preference
from common.model import arch
from common.shipping import cards
from common.training import footprint

log = logging.getLogger("ft")


def held_out(cfg, task, tok, rows: list[dict]) -> list:
    """(input ids, labels) of each eval row's reference answer (its last assistant turn trained, nothing else) for a
    task with held_out_loss; rows whose answer train.max_length cuts away are left out."""
    if not task.held_out_loss:
        return []
    enc = [prompts.encode_chat(tok, ex["prompt"], ex["completion"], cfg.train.max_length) for ex in rows]
    return [e for e in enc if e is not None]


def body(ctx: run.Context) -> None:
    from transformers import AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    task, a = tasks.get(cfg.task), arch.get(cfg)
    rows = io.read_jsonl(rp.split(cfg.eval.split))[: cfg.eval.num_examples]
    if not rows:
        raise io.UserError(f"{rp.split(cfg.eval.split)} has no examples; give data.test_size > 0")
    info = io.read_json(rp.adapter / "run_info.json", {})
    precision = info.get("plan", {}).get("precision", "fp32")
    source, why = compare.base_source(cfg)
    tok = AutoTokenizer.from_pretrained(rp.adapter if rp.adapter.exists() else source)
    extra = task.extra_prompts(cfg)
    examples = rows + [a.build(cfg, fields) for _, fields in extra]
    ids = [a.encode_prompt(cfg, tok, ex) for ex in examples]
    general = forgetting.passages()
    scored = held_out(cfg, task, tok, rows)
    pairs = preference.encode(cfg, tok, rows) if getattr(task, "pairs", False) else None
    extra_scored = pairs.sequences if pairs else []  # scored and cached with the answers, after the held-out ones
    has_val = cfg.eval.split != "val" and rp.split("val").exists()  # picks the strongest baseline and a sweep's best
    val = io.read_jsonl(rp.split("val")) if has_val else []
    val_ids = [a.encode_prompt(cfg, tok, ex) for ex in val]  # the tuned model answers them after the rest
    base = compare.base_generations(cfg, rp, tok, ids, precision, a, general, scored + extra_scored)
    tuned = compare.tuned_generations(cfg, rp, tok, ids + val_ids, precision, a, general, scored + extra_scored)
    k = len(scored)
    base_pairs, tuned_pairs = base.answer_losses[k:], tuned.answer_losses[k:]
    base.answer_losses, tuned.answer_losses = base.answer_losses[:k], tuned.answer_losses[:k]
    n = len(rows)
    train = [r for r in io.read_jsonl(rp.split("train")) if not r.get("replay")]  # the baselines read task examples
    m, side = compare.compare(cfg, task, rows, compare.head(base, n), compare.head(tuned, n), train, val)
    val_side = compare.val_scores(task, val, tuned.texts[len(ids):], m)
    m["base_weights"] = {"source": source, "why": why}
    m["n_prompts_truncated"] = sum(a.prompt_truncated(cfg, tok, ex) for ex in rows)
    answers = [{"prompt": label, "base": b, "tuned": t}
               for (label, _), b, t in zip(extra, base.texts[n:], tuned.texts[n:])]
    files = {}
    if pairs:
        p, per_pair = preference.evaluate(rows, pairs, base_pairs, tuned_pairs, preference.beta_of(cfg, info),
                                          cfg.eval.bootstrap)
        p["training_log"] = preference.usual_shape(preference.reward_curves(rp.out / "train_log.csv"))
        m["preference_accuracy"], files["preference_pairs.csv"] = p, compare.to_csv(per_pair)
    m["meta"] = compare.meta(cfg, rp, info)
    m["peak_memory"] = footprint.peak_summary(info)  # measured peak against make plan's prediction (None: none made)
    cards.write(cfg, rp, metrics=m)  # before metrics.json (the target): a kill in between re-runs eval
    compare.write(cfg, rp, m, side, answers, info, val_side, files)
    v, f = m["verdict"], m["forgetting"]
    log.info("%s base %.4f -> tuned %.4f; tuned - %s %+.4f, 95%% CI [%+.4f, %+.4f]: %s; general-text loss %.4f -> "
             "%.4f (%s) -> %s", task.primary, m["base"][task.primary], m["tuned"][task.primary], v["against"],
             v["mean"], v["ci_low"], v["ci_high"], v["verdict"], f["base_loss"], f["tuned_loss"], f["verdict"], rp.eval)
    if p := m.get("preference_accuracy"):
        log.info("preference accuracy on %d held-out pairs: start %.3f -> tuned %.3f (longer answer %.3f), change "
                 "%+.3f, 95%% CI [%+.3f, %+.3f]: %s", p["n"], p["start"], p["tuned"], p["longer"], p["mean"],
                 p["ci_low"], p["ci_high"], p["verdict"])
    if m["peak_memory"]:
        log.info("training's %s", m["peak_memory"]["line"])
    if h := m.get("answer_loss"):
        log.info("held-out answer loss %.4f -> %.4f, change %+.4f, 95%% CI [%+.4f, %+.4f]: %s", h["base_loss"],
                 h["tuned_loss"], h["mean"], h["ci_low"], h["ci_high"], h["verdict"])


def main(argv: list[str] | None = None) -> int:
    return run.main("eval", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
