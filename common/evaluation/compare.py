"""Base vs tuned on the eval split: cached base generations, the task's scores, the paired CI, the result files.

The task (common/tasks/) scores answers; this module compares the two models and writes what a reader opens:
side_by_side.csv, val_scores.csv (the tuned model on val), improved_examples.csv, fixed_prompts.csv (when the task
has extra prompts), report.md and, last, metrics.json, all inside one atomically replaced eval/ folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

from common.core import io, metadata, paths
from common.data import prompts
from common.evaluation import forgetting, metrics, preference
from common.model import modeling

log = logging.getLogger("ft")


@dataclass
class Answers:
    """One model's answers to the eval prompts, whether each stopped on EOS, its general-text losses and (a task with
    held_out_loss) its loss per token on each eval row's reference answer."""

    texts: list[str]
    stops: list[bool]
    general: list[float]
    answer_losses: list[float] = field(default_factory=list)


def base_source(cfg: Any) -> tuple[str, str]:
    """(where the base model is loaded from, why): the weights the tuned model is built on, so base and tuned differ
    only by the tuning; for a pre-quantized recipe the full-precision copy, which the merge uses and the adapter is
    put on for evaluation (modeling.load_tuned)."""
    full = bool(cfg.model.full_precision_name_or_path)
    why = ("model.full_precision_name_or_path: the weights the tuned model is built on" if full
           else "model.name_or_path: the weights the tuned model is built on")
    return modeling.model_source(cfg, full_precision=full), why


def tuned_weights_key(cfg: Any, rp: paths.RunPaths) -> str:
    """A hash of what the tuned model is: the adapter files and, evaluated merged, the merge report; evaluated as
    base + adapter, also the base weights the adapter is put on (as the base answers' key has them), so a changed
    model.full_precision_name_or_path regenerates both models' answers."""
    h = hashlib.sha256(cfg.eval.use.encode())
    if cfg.eval.use == "adapter":
        h.update(json.dumps([modeling.model_source(cfg, full_precision=True), cfg.model.revision,
                             cfg.model.trust_remote_code]).encode())
    files = [rp.adapter / "adapter_config.json", rp.adapter / "adapter_model.safetensors"]
    for f in files + ([rp.merge_report] if cfg.eval.use == "merged" else []):
        h.update(f.read_bytes() if f.exists() else b"-")
    return h.hexdigest()[:16]


def _generate(cfg: Any, cache: Path, key: str, label: str, load: Any, tok: Any, ids: list[list[int]],
              precision: str, architecture: Any, general: list[str], scored: list = ()) -> Answers:
    """Answers from `cache` when its key matches; otherwise load the model once, generate, score the general
    text and the `scored` (input ids, labels) answers, and write the cache."""
    if cache.exists():
        cached = io.read_jsonl(cache)
        if cached and cached[0].get("key") == key:
            log.info("%s generations: reusing %d cached answers (%s)", label, len(cached) - 2, cache.name)
            return Answers([r["answer"] for r in cached[2:]], [r["stopped"] for r in cached[2:]],
                           cached[1]["general_losses"], cached[1].get("answer_losses", []))
    model = load()
    stops: list[bool] = []
    texts = modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, architecture, cfg.eval.batch_size,
                              f"{label} model", precision, stops)
    t0 = time.perf_counter()
    losses = forgetting.token_losses(model, tok, general)
    log.info("%s model: general-text loss %.4f on %d passages (%.1f s)", label, sum(losses) / max(1, len(losses)),
             len(losses), time.perf_counter() - t0)
    held = forgetting.losses(model, tok, list(scored)) if scored else []
    if held:
        log.info("%s model: held-out answer loss %.4f on %d scored answers", label, sum(held) / len(held), len(held))
    io.write_jsonl(cache, [{"key": key}, {"general_losses": losses, "answer_losses": held}] +
                   [{"answer": a, "stopped": s} for a, s in zip(texts, stops)])
    return Answers(texts, stops, losses, held)


def head(a: Answers, n: int) -> Answers:
    """The first n answers (the eval rows; the rest answer the task's extra prompts)."""
    return Answers(a.texts[:n], a.stops[:n], a.general, a.answer_losses)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def base_generations(cfg: Any, rp: paths.RunPaths, tok: Any, ids: list[list[int]], precision: str,
                     architecture: Any, general: list[str], scored: list = ()) -> Answers:
    """The base model's answers, cached in outputs/<run>/base_generations.jsonl by weights, prompts, settings and
    general-text set, so re-running eval after more training does not regenerate them."""
    source, _ = base_source(cfg)
    key = _key(source, cfg.model.revision, cfg.model.trust_remote_code, ids, cfg.eval.max_new_tokens, precision,
               forgetting.fingerprint(general), "base", *([list(scored)] if scored else []))
    return _generate(cfg, rp.base_cache, key, "base",
                     lambda: modeling.load_model(cfg, source, 0, modeling.inference_dtype()),
                     tok, ids, precision, architecture, general, scored)


def tuned_generations(cfg: Any, rp: paths.RunPaths, tok: Any, ids: list[list[int]], precision: str,
                      architecture: Any, general: list[str], scored: list = ()) -> Answers:
    """The tuned model's answers, cached in outputs/<run>/tuned_generations.jsonl by the tuned weights (adapter
    files, merge report), prompts, settings and general-text set: a card-only change does not regenerate them."""
    key = _key(tuned_weights_key(cfg, rp), ids, cfg.eval.max_new_tokens, precision,
               forgetting.fingerprint(general), "tuned", *([list(scored)] if scored else []))
    return _generate(cfg, rp.tuned_cache, key, "tuned", lambda: modeling.load_tuned(cfg, rp, cfg.eval.use),
                     tok, ids, precision, architecture, general, scored)


STOP_RATE_FLAG = 0.9  # a tuned model whose answers end on EOS less often than this is flagged in the report


def strongest(task: Any, scores: dict[str, dict]) -> str | None:
    """The baseline with the highest aggregate primary metric (the first declared on a tie); None when none."""
    best = None
    for name, agg in scores.items():
        if best is None or agg[task.primary] > scores[best][task.primary]:
            best = name
    return best


def as_shown(cfg: Any, rows: list[dict]) -> list[dict]:
    """Eval rows as a baseline may read them: id, prompt, completion and only the record fields prompt.user shows
    the model (a rule must not read what the model cannot see, e.g. a sentiment label the prompt leaves out)."""
    import string

    shown = {n.split(".")[0].split("[")[0] for _, n, _, _ in string.Formatter().parse(cfg.prompt.user or "") if n}
    keep = shown | {"id", "prompt", "completion"}
    return [{k: v for k, v in r.items() if k in keep} for r in rows]


def choose_baseline(cfg: Any, task: Any, train: list[dict], val: list[dict], test_scores: dict[str, dict]
                    ) -> tuple[str | None, str, dict]:
    """(the strongest baseline, where it was chosen, its val scores): chosen on the validation split, so the test
    rows it is then compared on did not pick it (picking the best of several on test favours it by chance);
    on the evaluated rows only when there is no separate val split, and said so."""
    if len(test_scores) <= 1:
        return next(iter(test_scores), None), "the only baseline", {}
    if not val:
        return strongest(task, test_scores), "the evaluated rows: no separate val split", {}
    refs = [prompts.reference(r) for r in val]
    val_scores = {name: task.score(preds, refs)[0] for name, preds in task.baselines(train, as_shown(cfg, val)).items()
                  if name in test_scores}
    return strongest(task, val_scores), f"val ({len(val)} examples)", {k: v[task.primary] for k, v in val_scores.items()}


def compare(cfg: Any, task: Any, rows: list[dict], base: Answers, tuned: Answers, train: list[dict],
            val: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """(metrics.json content without meta, side-by-side rows) for base and tuned answers to `rows` and the task's
    baselines; every comparison is paired on the same examples. The strongest baseline is chosen on `val`
    (choose_baseline); the headline (`verdict`) is against the stronger on test of the base model and that
    baseline, so a "better" headline means better than both. stop_rate is the share of answers that ended on
    EOS before eval.max_new_tokens."""
    refs = [prompts.reference(r) for r in rows]
    key, n_boot = task.per_example, cfg.eval.bootstrap
    m: dict[str, Any] = {"n_examples": len(rows), "task": task.name, "primary_metric": task.primary}
    m["base"], per_b = task.score(base.texts, refs)
    m["tuned"], per_t = task.score(tuned.texts, refs)
    for name, a in (("base", base), ("tuned", tuned)):
        m[name]["stop_rate"] = sum(a.stops) / max(1, len(a.stops))
    m["tuned_does_not_stop"] = m["tuned"]["stop_rate"] < STOP_RATE_FLAG
    ours = [t[key] for t in per_t]
    m["comparison"] = {"metric": task.primary, "per_example": key, "against": "base",
                       **metrics.paired(ours, [b[key] for b in per_b], n_boot)}
    answers = task.baselines(train, as_shown(cfg, rows))
    m["baselines"], m["vs_baselines"], per_base = {}, {}, {}
    for name, preds in answers.items():
        m["baselines"][name], per_base[name] = task.score(preds, refs)
        m["vs_baselines"][name] = {"metric": task.primary, "per_example": key, "against": name,
                                   **metrics.paired(ours, [p[key] for p in per_base[name]], n_boot)}
    best, where, val_scores = choose_baseline(cfg, task, train, val or [], m["baselines"])
    m["strongest_baseline"], m["strongest_baseline_chosen_on"] = best, where
    if val_scores:
        m["baselines_val_" + task.primary] = val_scores
    base_leads = best is None or m["base"][task.primary] > m["baselines"][best][task.primary]
    m["verdict"] = m["comparison"] if base_leads else m["vs_baselines"][best]
    m["forgetting"] = {"set": str(paths.GENERAL_TEXT.relative_to(paths.REPO)),
                       **forgetting.compare(base.general, tuned.general, n_boot)}
    if base.answer_losses and tuned.answer_losses:  # the forgetting check's comparison, on the eval answers
        f = forgetting.compare(base.answer_losses, tuned.answer_losses, n_boot)
        m["answer_loss"] = {"examples": f.pop("passages"), **f}
    side = []
    for i, (r, ref) in enumerate(zip(rows, refs)):
        row = {"id": r["id"], "prompt": prompts.prompt_text(r), "reference": ref, "base": base.texts[i],
               "tuned": tuned.texts[i], f"base_{key}": round(per_b[i][key], 4), f"tuned_{key}": round(per_t[i][key], 4)}
        for name, preds in answers.items():
            row[name] = preds[i]
            row[f"{name}_{key}"] = round(per_base[name][i][key], 4)
        side.append(row)
    return m, side


def val_scores(task: Any, val: list[dict], texts: list[str], m: dict) -> list[dict]:
    """The tuned model's score on each val example (make sweep chooses its best run on these, never on test); the
    aggregate goes into m["val"]."""
    if not val:
        return []
    key = task.per_example
    agg, per = task.score(texts, [prompts.reference(r) for r in val])
    m["val"] = {"n_examples": len(val), "per_example": key, "tuned": agg}
    return [{"id": r["id"], f"tuned_{key}": round(p[key], 4)} for r, p in zip(val, per)]


def verdict_line(c: dict, n: int, who: str) -> str:
    """One sentence: the paired difference on the primary metric, its CI, and what it says."""
    line = (f"tuned - {who} on {c['metric']}: {c['mean']:+.4f}, 95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            f" (paired bootstrap over the same {n} examples) — the tuned model is "
            f"**{metrics.VERDICT_WORDS[c['verdict']]} {who}**.")
    return line + resolve_hint(c, n, "test examples")


def resolve_hint(c: dict, n: int, what: str) -> str:
    """For a comparison without a better/worse verdict: why, and roughly how many examples would settle one."""
    need = c.get("examples_to_resolve")
    if c["verdict"] == metrics.TOO_FEW:
        return (f" Too few examples to tell: a verdict needs at least {metrics.MIN_PAIRS} paired {what} of which "
                f"{metrics.MIN_DIFFERING} differ (this run has {n}, {c.get('pairs_differing', '?')} differ)"
                + (f"; roughly {need:,} would do for a difference of this size." if need else "."))
    if c["verdict"] != "not distinguishable":
        return ""
    if need is None:
        return (f" The mean difference is 0, so this run gives no size to plan for; a difference within the CI "
                f"cannot be ruled out, and more {what} would narrow it.")
    if need <= n:
        return (f" {n} {what} would resolve a difference of the observed size 4 times in 5 (80% power) and did not "
                "here: the true difference may well be smaller than observed.")
    return (f" A difference of this size would need roughly {need:,} {what} to resolve 4 times in 5 (80% power; "
            f"this run has {n}).")


def forgetting_lines(f: dict) -> list[str]:
    """The forgetting check in report.md: mean losses, the paired change, and a warning when it is worse."""
    lines = [f"General-text loss per token (`{f['set']}`, {f['passages']} passages; lower is better): base "
             f"{f['base_loss']:.4f}, tuned {f['tuned_loss']:.4f}; change {f['mean']:+.4f}, 95% CI "
             f"[{f['ci_low']:+.4f}, {f['ci_high']:+.4f}] — on general text the tuned model is "
             f"**{metrics.VERDICT_WORDS[f['verdict']]} the base model**." + resolve_hint(f, f["passages"], "passages")]
    if f["verdict"] == "worse":
        lines += ["", "**Warning: the tuned model forgot some general ability** (its loss on general text is higher "
                     "beyond the CI); a lower learning rate, fewer steps or a smaller LoRA rank usually costs less: "
                     "`make sweep` compares such settings by paired verdicts (README, Choosing settings)."]
    return lines


def to_csv(rows: list[dict]) -> str:
    buf = StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def base_weights_note(m: dict) -> str:
    w = m.get("base_weights")
    return f" Base answers from `{w['source']}` ({w['why']})." if w else ""


def headline_who(m: dict) -> str:
    """Whom the headline verdict is against: the strongest alternative, the base model included."""
    best, where = m.get("strongest_baseline"), m.get("strongest_baseline_chosen_on", "test")
    if m["verdict"]["against"] != "base":
        return f"the strongest alternative, baseline `{best}` (chosen on {where})"
    if best:
        return f"the strongest alternative, the base model (it scores above the strongest baseline, `{best}`)"
    return "the base model (the task declares no baselines)"


def report_md(cfg: Any, m: dict, examples: list[dict], notes: list[str]) -> str:
    names = list(m["baselines"])
    n = m["n_examples"]
    lines = [f"# Evaluation: {cfg.name}", "",
             f"Base model `{cfg.model.name_or_path}`, tuned with recipe `{cfg.name}` ({n} `{cfg.eval.split}` "
             f"examples, greedy, max_new_tokens={cfg.eval.max_new_tokens})." + base_weights_note(m), ""]
    v, p = m["verdict"], m.get("preference_accuracy")
    if p:  # a task with pairs leads with its question: does the tuned model prefer the chosen answers?
        lines += preference.report_lines(p, cfg.eval.split, resolve_hint(p, p["n"], "pairs"), p.get("training_log"))
    lines += [("## Generated answers against the chosen ones\n\n" if p else "") + f"**Verdict against {headline_who(m)}: "
              f"the tuned model is {metrics.VERDICT_WORDS[v['verdict']]} it** on {v['metric']} ({v['mean']:+.4f}, 95% CI "
              f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}])." + resolve_hint(v, n, "test examples"), ""]
    lines += ["| metric | base | tuned |" + "".join(f" {b} |" for b in names), "|---|---|---|" + "---|" * len(names)]
    for k, val in m["tuned"].items():
        cells = "".join(f" {m['baselines'][b][k]:.4f} |" if k in m["baselines"][b] else " - |" for b in names)
        lines.append(f"| {k} | {m['base'][k]:.4f} | {val:.4f} |" + cells)
    lines += ["", "Every comparison is paired on the same examples:", "",
              "- " + verdict_line(m["comparison"], n, "the base model")]
    lines += ["- " + verdict_line(m["vs_baselines"][b], n, f"baseline `{b}`") for b in names]
    if "answer_loss" in m:
        h = m["answer_loss"]
        lines += ["", f"Held-out answer loss per token ({h['examples']} `{cfg.eval.split}` reference answers; lower is "
                      f"better): base {h['base_loss']:.4f}, tuned {h['tuned_loss']:.4f}; change {h['mean']:+.4f}, "
                      f"95% CI [{h['ci_low']:+.4f}, {h['ci_high']:+.4f}] — on these answers the tuned model is "
                      f"**{metrics.VERDICT_WORDS[h['verdict']]} the base model**." +
                  resolve_hint(h, h["examples"], "test examples")]
    lines += [""] + forgetting_lines(m["forgetting"])
    if m.get("n_prompts_truncated"):
        lines.append(f"**{m['n_prompts_truncated']} of {n} eval prompts were longer than train.max_length="
                     f"{cfg.train.max_length}** and were truncated (their user content cut); raise train.max_length "
                     "to evaluate them whole.")
    if m.get("tuned_does_not_stop"):
        lines.append(f"**Warning: the tuned model does not stop.** Only {m['tuned']['stop_rate']:.0%} of its answers "
                     f"ended on EOS within max_new_tokens={cfg.eval.max_new_tokens} (base: {m['base']['stop_rate']:.0%})"
                     "; check that the training answers end with the EOS token (prompt.template) or raise "
                     "eval.max_new_tokens.")
    lines += ["", "Settings replaced on this machine: " + "; ".join(notes)] if notes else []
    lines += ["", f"Training's {m['peak_memory']['line']}."] if m.get("peak_memory") else []  # make plan's check
    lines += ["", "## Examples", ""]
    flat = lambda s: " ".join(str(s).split())  # noqa: E731 (one line per answer in Markdown)
    for ex in examples[:3]:
        lines += [f"**Prompt:** {flat(ex['prompt'])}", "", f"- reference: {flat(ex['reference'])}",
                  f"- base: {flat(ex['base'])}", f"- tuned: {flat(ex['tuned'])}"]
        lines += [f"- {b}: {flat(ex[b])}" for b in names if b in ex] + [""]
    return "\n".join(lines) + "\n"


def meta(cfg: Any, rp: paths.RunPaths, info: dict) -> dict:
    """metrics.json's self-description."""
    return metadata.describe(cfg, "eval", tuned_model=str(rp.merged if cfg.eval.use == "merged" else rp.adapter),
                             replaced=info.get("plan", {}).get("replaced", []),
                             generation_precision=info.get("plan", {}).get("precision", "fp32"))


def write(cfg: Any, rp: paths.RunPaths, m: dict, side: list[dict], extra: list[dict], info: dict,
          val_side: list[dict] = (), files: dict[str, str] | None = None) -> None:
    """The eval/ folder, replaced whole (with `files`: {name: text} more); metrics.json is written last inside it."""
    key = m["comparison"]["per_example"]
    improved = sorted((s for s in side if s[f"tuned_{key}"] > s[f"base_{key}"]),
                      key=lambda s: s[f"base_{key}"] - s[f"tuned_{key}"])
    m.setdefault("meta", meta(cfg, rp, info))
    with io.atomic_dir(rp.eval) as tmp:
        io.atomic_write_text(tmp / "side_by_side.csv", to_csv(side))
        io.atomic_write_text(tmp / "improved_examples.csv", to_csv(improved))
        if val_side:
            io.atomic_write_text(tmp / "val_scores.csv", to_csv(list(val_side)))
        if extra:
            io.atomic_write_text(tmp / "fixed_prompts.csv", to_csv(extra))
        for name, text in (files or {}).items():
            io.atomic_write_text(tmp / name, text)
        io.atomic_write_text(tmp / "report.md", report_md(cfg, m, improved or side, info.get("plan", {}).get("replaced", [])))
        io.atomic_write_json(tmp / "metrics.json", m)
