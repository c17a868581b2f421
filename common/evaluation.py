"""Base vs tuned on the eval split: cached base generations, the task's scores, the paired CI, the result files.

The task (common/tasks/) scores answers; this module compares the two models and writes what a reader opens:
side_by_side.csv, improved_examples.csv, fixed_prompts.csv (when the task has extra prompts), report.md and,
last, metrics.json, all inside one atomically replaced eval/ folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from io import StringIO
from typing import Any

from common import io, metadata, metrics, modeling, paths, prompts

log = logging.getLogger("ft")


def base_generations(cfg: Any, rp: paths.RunPaths, tok: Any, ids: list[list[int]], precision: str,
                     architecture: Any) -> tuple[list[str], list[bool]]:
    """The base model's answers and whether each stopped, cached in outputs/<run>/base_generations.jsonl by model,
    prompts and settings."""
    source = modeling.model_source(cfg)
    key = hashlib.sha256(json.dumps([source, ids, cfg.eval.max_new_tokens, precision, "stops"]).encode()).hexdigest()[:16]
    if rp.base_cache.exists():
        cached = io.read_jsonl(rp.base_cache)
        if cached and cached[0].get("key") == key:
            log.info("base generations: reusing %d cached answers (%s)", len(cached) - 1, rp.base_cache.name)
            return [r["answer"] for r in cached[1:]], [r["stopped"] for r in cached[1:]]
    model = modeling.load_model(cfg, source, 0, modeling.inference_dtype())
    stops: list[bool] = []
    answers = modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, architecture, cfg.eval.batch_size,
                                "base model", precision, stops)
    io.write_jsonl(rp.base_cache, [{"key": key, "model": source}] +
                   [{"answer": a, "stopped": s} for a, s in zip(answers, stops)])
    return answers, stops


STOP_RATE_FLAG = 0.9  # a tuned model whose answers end on EOS less often than this is flagged in the report


def compare(cfg: Any, task: Any, rows: list[dict], base: list[str], tuned: list[str], train_refs: list[str],
            base_stops: list[bool], tuned_stops: list[bool]) -> tuple[dict, list[dict]]:
    """(metrics.json content without meta, side-by-side rows) for base and tuned answers to `rows`; stop_rate is
    the share of answers that ended on EOS before eval.max_new_tokens."""
    refs = [prompts.reference(r) for r in rows]
    m: dict[str, Any] = {"n_examples": len(rows), "task": task.name, "primary_metric": task.primary}
    m["base"], per_b = task.score(base, refs)
    m["tuned"], per_t = task.score(tuned, refs)
    for name, stops in (("base", base_stops), ("tuned", tuned_stops)):
        m[name]["stop_rate"] = sum(stops) / max(1, len(stops))
    m["tuned_does_not_stop"] = m["tuned"]["stop_rate"] < STOP_RATE_FLAG
    trivial = task.baseline(train_refs)
    if trivial is not None:
        m["trivial"], _ = task.score([trivial] * len(refs), refs)
        m["trivial_prediction"] = trivial
        m["beats_trivial"] = m["tuned"][task.primary] > m["trivial"][task.primary]
    key = task.per_example
    mean, lo, hi = metrics.bootstrap_ci([t[key] - b[key] for t, b in zip(per_t, per_b)], cfg.eval.bootstrap)
    m["comparison"] = {"metric": task.primary, "per_example": key, "mean": mean, "ci_low": lo, "ci_high": hi,
                       "confidence": 0.95, "bootstrap_resamples": cfg.eval.bootstrap}
    side = [{"id": r["id"], "prompt": prompts.prompt_text(r), "reference": ref, "base": b, "tuned": t,
             f"base_{key}": round(pb[key], 4), f"tuned_{key}": round(pt[key], 4)}
            for r, ref, b, t, pb, pt in zip(rows, refs, base, tuned, per_b, per_t)]
    return m, side


def to_csv(rows: list[dict]) -> str:
    buf = StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def report_md(cfg: Any, m: dict, examples: list[dict], notes: list[str]) -> str:
    triv = "trivial" in m
    lines = [f"# Evaluation: {cfg.name}", "",
             f"Base model `{cfg.model.name_or_path}`, tuned with recipe `{cfg.name}` ({m['n_examples']} "
             f"`{cfg.eval.split}` examples, greedy, max_new_tokens={cfg.eval.max_new_tokens}).", "",
             "| metric | base | tuned |" + (" trivial |" if triv else ""), "|---|---|---|" + ("---|" if triv else "")]
    for k, v in m["tuned"].items():
        trivial = f" {m['trivial'][k]:.4f} |" if triv and k in m["trivial"] else " - |" if triv else ""
        lines.append(f"| {k} | {m['base'][k]:.4f} | {v:.4f} |" + trivial)
    c = m["comparison"]
    verdict = "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "not distinguishable from the base"
    lines += ["", f"**{c['metric']} difference (tuned - base): {c['mean']:+.4f}, 95% CI [{c['ci_low']:+.4f}, "
              f"{c['ci_high']:+.4f}]** — the tuned model is {verdict} at this sample size."]
    if m.get("tuned_does_not_stop"):
        lines.append(f"**Warning: the tuned model does not stop.** Only {m['tuned']['stop_rate']:.0%} of its answers "
                     f"ended on EOS within max_new_tokens={cfg.eval.max_new_tokens} (base: {m['base']['stop_rate']:.0%})"
                     "; check that the training answers end with the EOS token (prompt.template) or raise "
                     "eval.max_new_tokens.")
    if "beats_trivial" in m:
        lines.append(f"Tuned vs trivial predictor on {m['primary_metric']}: "
                     f"{'beats it' if m['beats_trivial'] else 'does not beat it'}.")
    if notes:
        lines += ["", "Settings replaced on this machine: " + "; ".join(notes)]
    lines += ["", "## Examples", ""]
    flat = lambda s: " ".join(str(s).split())  # noqa: E731 (one line per answer in Markdown)
    for ex in examples[:3]:
        lines += [f"**Prompt:** {flat(ex['prompt'])}", "", f"- reference: {flat(ex['reference'])}",
                  f"- base: {flat(ex['base'])}", f"- tuned: {flat(ex['tuned'])}", ""]
    return "\n".join(lines) + "\n"


def meta(cfg: Any, rp: paths.RunPaths, info: dict) -> dict:
    """metrics.json's self-description."""
    return metadata.describe(cfg, "eval", tuned_model=str(rp.merged if cfg.eval.use == "merged" else rp.adapter),
                             replaced=info.get("replaced", []),
                             generation_precision=info.get("plan", {}).get("precision", "fp32"))


def write(cfg: Any, rp: paths.RunPaths, m: dict, side: list[dict], extra: list[dict], info: dict) -> None:
    """The eval/ folder, replaced whole; metrics.json is written last inside it."""
    key = m["comparison"]["per_example"]
    improved = sorted((s for s in side if s[f"tuned_{key}"] > s[f"base_{key}"]),
                      key=lambda s: s[f"base_{key}"] - s[f"tuned_{key}"])
    m.setdefault("meta", meta(cfg, rp, info))
    with io.atomic_dir(rp.eval) as tmp:
        io.atomic_write_text(tmp / "side_by_side.csv", to_csv(side))
        io.atomic_write_text(tmp / "improved_examples.csv", to_csv(improved))
        if extra:
            io.atomic_write_text(tmp / "fixed_prompts.csv", to_csv(extra))
        io.atomic_write_text(tmp / "report.md", report_md(cfg, m, improved or side, info.get("replaced", [])))
        io.atomic_write_json(tmp / "metrics.json", m)
