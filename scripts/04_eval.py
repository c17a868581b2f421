"""Evaluate the base and the tuned model on the test split and compare them.

    make eval RECIPE=smollm2           # or: python scripts/04_eval.py --recipe smollm2

Greedy, batched generation (length-sorted batches, left padding, KV cache, eval.max_new_tokens) for the base
model and the tuned model (eval.use: merged, or base + adapter). Base generations are cached in
outputs/<run>/base_generations.jsonl, keyed by model, prompts and decoding settings, so re-running eval after
more training does not regenerate them.

Metrics, by task:
  product_description: ROUGE-1/2/L (rouge-score), sacreBLEU and chrF (sacrebleu), mean length ratio, share of
      empty and of degenerate (repetitive) outputs; the ROUGE-L difference tuned - base with a paired 95%
      bootstrap confidence interval.
  xauusd_forecast: share of raw outputs that parse as JSON with every field, the same after light repair
      (first {...} block), per-horizon direction accuracy and macro-F1, magnitude MAE; also for a trivial
      predictor (train-split majority direction and mean magnitude); direction-accuracy difference with CI.

Writes outputs/<run>/eval/ atomically: side_by_side.csv, improved_examples.csv, fixed_prompts.csv (when
eval.fixed_prompts is set), report.md and metrics.json.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import sys
from collections import Counter
from typing import Any

from common import modeling, prompts, run

log = logging.getLogger("ft")
HORIZONS = ("6h", "12h", "24h", "48h")
DIRECTIONS = ("up", "down", "flat")


# --------------------------------------------------------------------------- generation
def prompt_ids(cfg: Any, tok: Any, rows: list[dict]) -> list[list[int]]:
    if cfg.model.arch == "seq2seq":
        return [tok(r["prompt"], max_length=cfg.train.max_length, truncation=True).input_ids for r in rows]
    return [prompts.encode_prompt(tok, r["prompt"]) for r in rows]


def base_generations(cfg: Any, ctx: run.Context, tok: Any, ids: list[list[int]], precision: str) -> list[str]:
    source = modeling.model_source(cfg)
    key = hashlib.sha256(json.dumps([source, ids, cfg.eval.max_new_tokens, precision]).encode()).hexdigest()[:16]
    cache = ctx.paths.base_cache
    if cache.exists():
        cached = run.read_jsonl(cache)
        if cached and cached[0].get("key") == key:
            log.info("base generations: reusing %d cached answers (%s)", len(cached) - 1, cache.name)
            return [r["answer"] for r in cached[1:]]
    model = modeling.load_model(cfg, source, 0, modeling.inference_dtype())
    answers = modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, cfg.eval.batch_size, "base model", precision)
    run.write_jsonl(cache, [{"key": key, "model": source}] + [{"answer": a} for a in answers])
    del model
    return answers


# --------------------------------------------------------------------------- metrics
def bootstrap_ci(diffs: list[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% percentile bootstrap interval."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def degenerate(text: str) -> bool:
    """Repetitive output: a 4-gram repeated 3+ times, or under 40% distinct 3-grams in a long answer."""
    w = text.split()
    grams4 = Counter(tuple(w[i:i + 4]) for i in range(len(w) - 3))
    if grams4 and grams4.most_common(1)[0][1] >= 3:
        return True
    grams3 = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return len(grams3) >= 15 and len(set(grams3)) / len(grams3) < 0.4


def text_scores(preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = []
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        per.append({k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")} |
                   {"len_ratio": len(p.split()) / max(1, len(r.split())), "empty": not p.strip(),
                    "degenerate": degenerate(p)})
    n = max(1, len(per))
    agg = {k: sum(x[k] for x in per) / n for k in ("rouge1", "rouge2", "rougeL", "len_ratio")}
    agg["empty_share"] = sum(x["empty"] for x in per) / n
    agg["degenerate_share"] = sum(x["degenerate"] for x in per) / n
    agg["sacrebleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
    agg["chrf"] = sacrebleu.corpus_chrf(preds, [refs]).score
    return agg, per


def parse_forecast(text: str, repair: bool) -> dict | None:
    """The forecast dict if `text` is (or, with repair, contains) a JSON object with every horizon's fields."""
    cand = text.strip()
    if repair:
        m = re.search(r"\{.*\}", cand, re.S)
        if not m:
            return None
        cand = m.group(0)
    try:
        obj = json.loads(cand)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for h in HORIZONS:
        v = obj.get(h)
        if not isinstance(v, dict) or v.get("direction") not in DIRECTIONS:
            return None
        mag = v.get("magnitude")
        if isinstance(mag, bool) or not isinstance(mag, (int, float)):
            return None
        out[h] = {"direction": v["direction"], "magnitude": float(mag)}
    return out


def macro_f1(y: list[str], p: list[str]) -> float:
    f1s = []
    for c in DIRECTIONS:
        tp = sum(a == c and b == c for a, b in zip(y, p))
        fp = sum(a != c and b == c for a, b in zip(y, p))
        fn = sum(a == c and b != c for a, b in zip(y, p))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def forecast_scores(preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
    """Invalid outputs count as wrong directions and add the reference magnitude to the MAE (a 0 forecast)."""
    gold = [parse_forecast(r, repair=False) for r in refs]
    raw = [parse_forecast(p, repair=False) for p in preds]
    fixed = [parse_forecast(p, repair=True) for p in preds]
    agg: dict[str, Any] = {"json_valid_raw": sum(x is not None for x in raw) / max(1, len(preds)),
                           "json_valid_repaired": sum(x is not None for x in fixed) / max(1, len(preds))}
    per = [{"valid_raw": r is not None, "correct": 0} for r in raw]
    accs, f1s, maes = [], [], []
    for h in HORIZONS:
        y = [g[h]["direction"] for g in gold]
        p = [f[h]["direction"] if f else "invalid" for f in fixed]
        acc = sum(a == b for a, b in zip(y, p)) / max(1, len(y))
        mae = sum(abs(g[h]["magnitude"] - (f[h]["magnitude"] if f else 0.0)) for g, f in zip(gold, fixed)) / max(1, len(y))
        agg[f"direction_acc_{h}"], agg[f"direction_macro_f1_{h}"], agg[f"magnitude_mae_{h}"] = acc, macro_f1(y, p), mae
        accs.append(acc)
        f1s.append(agg[f"direction_macro_f1_{h}"])
        maes.append(mae)
        for i, (a, b) in enumerate(zip(y, p)):
            per[i]["correct"] += (a == b) / len(HORIZONS)
    agg["direction_acc"], agg["direction_macro_f1"], agg["magnitude_mae"] = (sum(accs) / 4, sum(f1s) / 4, sum(maes) / 4)
    return agg, per


def trivial_forecast(train_rows: list[dict]) -> str:
    """Majority direction and mean magnitude per horizon, from the train split."""
    gold = [parse_forecast(prompts.reference(r), repair=False) for r in train_rows]
    gold = [g for g in gold if g]
    out = {}
    for h in HORIZONS:
        direction = Counter(g[h]["direction"] for g in gold).most_common(1)[0][0]
        out[h] = {"direction": direction, "magnitude": round(sum(g[h]["magnitude"] for g in gold) / len(gold), 2)}
    return json.dumps(out, separators=(",", ":"))


# --------------------------------------------------------------------------- report
def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def report_md(cfg: Any, metrics: dict, examples: list[dict], notes: list[str]) -> str:
    lines = [f"# Evaluation: {cfg.name}", "",
             f"Base model `{cfg.model.name_or_path}`, tuned with recipe `{cfg.name}` "
             f"({metrics['n_examples']} `{cfg.eval.split}` examples, greedy, max_new_tokens={cfg.eval.max_new_tokens}).",
             "", "| metric | base | tuned |" + (" trivial |" if "trivial" in metrics else ""),
             "|---|---|---|" + ("---|" if "trivial" in metrics else "")]
    for k, v in metrics["tuned"].items():
        row = f"| {k} | {metrics['base'][k]:.4f} | {v:.4f} |"
        if "trivial" in metrics:
            row += f" {metrics['trivial'].get(k, float('nan')):.4f} |"
        lines.append(row)
    c = metrics["comparison"]
    lines += ["", f"**{c['metric']} difference (tuned - base): {c['mean']:+.4f}, 95% CI [{c['ci_low']:+.4f}, "
              f"{c['ci_high']:+.4f}]** — the tuned model is "
              f"{'better' if c['ci_low'] > 0 else 'worse' if c['ci_high'] < 0 else 'not distinguishable from the base'}"
              " at this sample size."]
    if "beats_trivial" in metrics:
        lines.append(f"Tuned vs trivial predictor on direction accuracy: "
                     f"{'beats it' if metrics['beats_trivial'] else 'does not beat it'}.")
    if notes:
        lines += ["", "Settings replaced on this machine: " + "; ".join(notes)]
    lines += ["", "## Examples", ""]
    flat = lambda s: " ".join(str(s).split())  # noqa: E731 (one line per answer in Markdown)
    for ex in examples[:3]:
        lines += [f"**Prompt:** {flat(ex['prompt'])}", "", f"- reference: {flat(ex['reference'])}",
                  f"- base: {flat(ex['base'])}", f"- tuned: {flat(ex['tuned'])}", ""]
    return "\n".join(lines) + "\n"


def body(ctx: run.Context) -> None:
    from transformers import AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    rows = run.read_jsonl(rp.split(cfg.eval.split))[: cfg.eval.num_examples]
    if not rows:
        raise run.UserError(f"{rp.split(cfg.eval.split)} has no examples; give data.test_size > 0")
    info = json.loads((rp.adapter / "run_info.json").read_text()) if (rp.adapter / "run_info.json").exists() else {}
    precision = info.get("plan", {}).get("precision", "fp32")
    tok = AutoTokenizer.from_pretrained(rp.adapter if rp.adapter.exists() else modeling.model_source(cfg))
    tok.padding_side = "left"
    ids = prompt_ids(cfg, tok, rows)
    fixed = [prompts.build(cfg, {"title": t, "content": ""}) for t in cfg.eval.fixed_prompts] \
        if cfg.task == "product_description" else []
    fixed_ids = prompt_ids(cfg, tok, fixed)
    base = base_generations(cfg, ctx, tok, ids + fixed_ids, precision)
    model = modeling.load_tuned(cfg, rp, cfg.eval.use)
    tuned = modeling.generate(model, tok, ids + fixed_ids, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                              "tuned model", precision)
    base, base_fixed, tuned, tuned_fixed = base[: len(ids)], base[len(ids):], tuned[: len(ids)], tuned[len(ids):]
    refs = [prompts.reference(r) for r in rows]

    metrics: dict[str, Any] = {"n_examples": len(rows)}
    if cfg.task == "xauusd_forecast":
        trivial_answer = trivial_forecast(run.read_jsonl(rp.split("train")))
        metrics["base"], per_b = forecast_scores(base, refs)
        metrics["tuned"], per_t = forecast_scores(tuned, refs)
        metrics["trivial"], _ = forecast_scores([trivial_answer] * len(refs), refs)
        metrics["trivial_prediction"] = trivial_answer
        metrics["beats_trivial"] = metrics["tuned"]["direction_acc"] > metrics["trivial"]["direction_acc"]
        key, name = "correct", "direction_acc"
    else:
        metrics["base"], per_b = text_scores(base, refs)
        metrics["tuned"], per_t = text_scores(tuned, refs)
        key, name = "rougeL", "rougeL"
    mean, lo, hi = bootstrap_ci([t[key] - b[key] for t, b in zip(per_t, per_b)], cfg.eval.bootstrap)
    metrics["comparison"] = {"metric": name, "mean": mean, "ci_low": lo, "ci_high": hi, "confidence": 0.95,
                             "bootstrap_resamples": cfg.eval.bootstrap}
    metrics["meta"] = run.describe(cfg, "eval", tuned_model=str(rp.merged if cfg.eval.use == "merged" else rp.adapter),
                                   replaced=info.get("replaced", []), generation_precision=precision)

    side = [{"id": r["id"], "prompt": prompts.prompt_text(r), "reference": ref, "base": b, "tuned": t,
             f"base_{key}": round(pb[key], 4), f"tuned_{key}": round(pt[key], 4)}
            for r, ref, b, t, pb, pt in zip(rows, refs, base, tuned, per_b, per_t)]
    improved = sorted((s for s in side if s[f"tuned_{key}"] > s[f"base_{key}"]),
                      key=lambda s: s[f"base_{key}"] - s[f"tuned_{key}"])
    with run.atomic_dir(rp.eval) as tmp:
        run.atomic_write_text(tmp / "side_by_side.csv", to_csv(side))
        run.atomic_write_text(tmp / "improved_examples.csv", to_csv(improved))
        if fixed:
            run.atomic_write_text(tmp / "fixed_prompts.csv", to_csv(
                [{"title": t, "base": b, "tuned": u} for t, b, u in zip(cfg.eval.fixed_prompts, base_fixed, tuned_fixed)]))
        run.atomic_write_text(tmp / "report.md", report_md(cfg, metrics, improved or side, info.get("replaced", [])))
        run.atomic_write_json(tmp / "metrics.json", metrics)
    c = metrics["comparison"]
    log.info("%s base %.4f -> tuned %.4f; difference %+.4f, 95%% CI [%+.4f, %+.4f] -> %s", name,
             metrics["base"][name], metrics["tuned"][name], c["mean"], c["ci_low"], c["ci_high"], rp.eval)


def main(argv: list[str] | None = None) -> int:
    return run.main("eval", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
