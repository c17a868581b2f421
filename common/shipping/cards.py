"""Model cards: merged/README.md and adapter/README.md in the hub's format, from the run's own files.

Every figure in a card is read from a file the pipeline wrote (prepare_report.json, adapter/run_info.json with, for
a preference run, its `preference` block: method, beta, starting model, reference; merge_report.json,
eval/metrics.json, export/export_report.json when present), so a card always matches what was evaluated. 04_eval
writes the cards; 06_export rewrites them with the Ollama section; 08_push uploads them.
"""
from __future__ import annotations

import json
import shutil
from typing import Any

from common.core import io, paths
from common.evaluation.metrics import MIN_DIFFERING, MIN_PAIRS, TOO_FEW, VERDICT_WORDS

FRAMEWORK_TAG = "llm-finetune-recipes"


def base_model(cfg: Any) -> str:
    return cfg.card.base_model or cfg.model.name_or_path


def _front_matter(cfg: Any, kind: str, method: str, extra: tuple[str, ...] = ()) -> str:
    seq2seq = cfg.model.arch == "seq2seq"
    meta: dict[str, Any] = {
        "base_model": base_model(cfg),
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text2text-generation" if seq2seq else "text-generation",
        "license": cfg.card.license or "other",
        "tags": [FRAMEWORK_TAG, method, cfg.task, *(["lora"] if method != "lora" else []), *extra, *cfg.card.tags],
    }
    return "---\n" + "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in meta.items()) + "---\n"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


PREFERENCE_NAMES = {"dpo": "DPO", "ipo": "IPO", "orpo": "ORPO", "simpo": "SimPO"}


def preference_line(p: dict, cfg: Any) -> str:
    """The method, beta (and SimPO's gamma), the starting model and the reference, from run_info.json's preference;
    a start that is the recipe's base model is named as the card names it (card.base_model)."""
    name, start = p.get("method", "?"), p.get("starting_model")
    start = f"the base model `{base_model(cfg)}`" if start == cfg.model.name_or_path else f"`{start}`"
    gamma = f", gamma {p['simpo_gamma']}" if name == "simpo" and p.get("simpo_gamma") is not None else ""
    ref = f"; reference: {p['reference']}" if p.get("reference") and name in ("dpo", "ipo") else ""
    free = ", reference-free" if name in ("orpo", "simpo") else ""
    pairs = f" on {p['pairs']} preference pairs" if p.get("pairs") else ""
    return (f"Preference-tuned with {PREFERENCE_NAMES.get(name, name)} (beta {p.get('beta')}{gamma}{free}){pairs}, "
            f"starting from {start}{ref}.")


def evaluation_section(cfg: Any, m: dict) -> list[str]:
    """The card's Evaluation: metrics for base, tuned and each baseline; the paired verdicts; the forgetting check."""
    if "verdict" not in m:  # evaluated by an older version of this project
        return ["## Evaluation", "", "Evaluated by an older version of this project: run `make eval` again for the "
                "verdicts against the baselines and the forgetting check.", ""]
    names = list(m.get("baselines", {}))
    c, v, f = m["comparison"], m["verdict"], m["forgetting"]
    lines = ["## Evaluation", "", f"{m['n_examples']} `{cfg.eval.split}` examples, greedy, max_new_tokens="
             f"{cfg.eval.max_new_tokens}." + (f" Base answers from `{m['base_weights']['source']}`."
                                              if m.get("base_weights") else ""), "",
             "| metric | base | tuned |" + "".join(f" {b} |" for b in names), "|---|---|---|" + "---|" * len(names)]
    lines += [f"| {k} | {_fmt(m['base'][k])} | {_fmt(val)} |"
              + "".join(f" {_fmt(m['baselines'][b].get(k, '-'))} |" for b in names) for k, val in m["tuned"].items()]
    lines += ["", f"**{c['metric']} difference (tuned - base): {c['mean']:+.4f}, 95% CI [{c['ci_low']:+.4f}, "
              f"{c['ci_high']:+.4f}]** (paired bootstrap, {c['bootstrap_resamples']} resamples): "
              f"{VERDICT_WORDS[c['verdict']]} the base model."]
    best = m.get("strongest_baseline")
    if best:
        b = m["vs_baselines"][best]
        lines.append(f"**Against the strongest simple baseline, `{best}`: {b['mean']:+.4f}, 95% CI "
                     f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]: {VERDICT_WORDS[b['verdict']]} it.**")
        if v["against"] == "base":
            lines.append("The base model scores above every baseline, so the headline is against the base model.")
    if TOO_FEW in (c["verdict"], v["verdict"]):
        lines.append(f"With {m['n_examples']} examples there are too few to tell (a verdict needs at least "
                     f"{MIN_PAIRS} paired examples, {MIN_DIFFERING} of them different).")
    lines.append(f"General-text loss per token ({f['passages']} passages, lower is better): base {f['base_loss']:.4f}, "
                 f"tuned {f['tuned_loss']:.4f}, change {f['mean']:+.4f}, 95% CI [{f['ci_low']:+.4f}, "
                 f"{f['ci_high']:+.4f}]: on general text the tuned model is {VERDICT_WORDS[f['verdict']]} the base "
                 "model"
                 + (" (it forgot some general ability)." if f["verdict"] == "worse" else "."))
    if p := m.get("preference_accuracy"):
        lines.append(f"Preference accuracy ({p['n']} held-out pairs, share where the chosen answer is the more "
                     f"likely): starting model {p['start']:.1%}, tuned {p['tuned']:.1%}, the longer answer "
                     f"{p['longer']:.1%}; "
                     f"tuned - start {p['mean']:+.4f}, 95% CI [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]: "
                     f"{VERDICT_WORDS[p['verdict']]} the starting model.")
    lines += [f"Share of answers that ended on EOS: base {m['base']['stop_rate']:.0%}, tuned "
              f"{m['tuned']['stop_rate']:.0%}.", ""]
    return lines


def render(cfg: Any, rp: paths.RunPaths, kind: str, metrics: dict | None = None, exported: dict | None = None) -> str:
    """The card of `kind` ("merged" or "adapter") from the files on disk; `metrics` / `exported`: the content of
    eval/metrics.json / export_report.json about to be committed (the cards are written before a step's target)."""
    prep = io.read_json(rp.prepare_report, {})
    info = io.read_json(rp.adapter / "run_info.json", {})
    merge = io.read_json(rp.merge_report, {})
    m = metrics if metrics is not None else io.read_json(rp.eval / "metrics.json", {})
    exp = exported if exported is not None else io.read_json(rp.export_report, {})
    plan = info.get("plan", {})
    bits = plan.get("quantization_bits", cfg.quantization.bits)
    method = "qlora" if bits else "lora"
    base = base_model(cfg)
    pref = info.get("preference") or {}
    lines = [_front_matter(cfg, kind, method, tuple(t for t in [pref.get("method")] if t)),
             f"# {cfg.run}: {cfg.description or cfg.name}", ""]
    if cfg.tiny_mode:
        lines += ["> **Test run on a random-init stand-in model** (tiny-model mode): it checks the pipeline and "
                  "answers nothing useful.", ""]
    what = "a LoRA adapter" if kind == "adapter" else "the base model with the LoRA adapter merged in (fp16)"
    lines += [f"This is {what} for `{base}`, fine-tuned for the task **{cfg.task}** with the recipe "
              f"`recipes/{cfg.name}.yaml` of {FRAMEWORK_TAG} ({method.upper()}, r={cfg.lora.r}, alpha={cfg.lora.alpha}, "
              f"target modules {cfg.lora.target_modules}).", ""]
    if pref:
        lines += [preference_line(pref, cfg), ""]
    if prep:
        drops = ", ".join(f"{k} {v}" for k, v in prep.get("dropped", {}).items()) or "none"
        sp = prep.get("splits", {})
        lines += ["## Data", "", f"From `{prep.get('source')}`: {prep.get('read')} records read, {prep.get('kept')} "
                  f"kept (dropped: {drops}); splits train {sp.get('train')}, val {sp.get('val')}, test {sp.get('test')}.", ""]
    if info:
        t = cfg.train
        secs = info.get("train_seconds") or 0
        speed = f", {info['train_tokens_per_second']:,.0f} tokens/s" if info.get("train_tokens_per_second") else ""
        if info.get("resumed_from"):
            speed += f" (resumed: {info.get('steps_this_process')} steps in the last process)"
        hw = info.get("hardware", {})
        lines += ["## Training", "",
                  f"- {info.get('global_step')} steps, learning rate {t.learning_rate} ({t.lr_scheduler}), batch "
                  f"{t.batch_size} x {t.grad_accum} accumulation, max length {t.max_length}, {plan.get('precision')} "
                  f"on {plan.get('device')}" + (f" ({hw.get('name')})" if hw.get("name") else ""),
                  f"- train loss {_fmt(info.get('train_loss'))} (last process), best val loss {_fmt(info.get('best_eval_loss'))}; "
                  f"{secs:.0f} s{speed}; peak memory {info.get('peak_rss_mb')} MB RAM"
                  + (f", {info['peak_gpu_mb']} MB GPU" if info.get("peak_gpu_mb") else "")]
        for note in info.get("plan", {}).get("replaced", []):
            lines.append(f"- replaced on this machine: {note}")
        lines += ["", "![training and validation loss](loss.png)", ""]
    if m:
        lines += evaluation_section(cfg, m)
    if merge.get("token_agreement") is not None:
        lines += ["## Checks", "", f"- merged vs adapter on {merge['check_prompts']} val examples: next-token agreement "
                  f"{merge['token_agreement']:.4f}, identical greedy answers {merge['answer_match']:.0%}."]
        for q, f in exp.get("files", {}).items():
            lines.append(f"- `{f['file']}` vs merged: next-token agreement {f['token_agreement']:.4f}, identical "
                         f"greedy answers {f['answer_match']:.0%}, prompt tokens identical {f['prompt_tokens_match']:.0%}.")
        lines.append("")
    repo = cfg.card.repo_id or f"<user>/{cfg.run}"
    lines += ["## How to use", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM" if cfg.model.arch == "causal"
                  else "from peft import AutoPeftModelForSeq2SeqLM as AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # loads {base} + this adapter',
                  f'tok = AutoTokenizer.from_pretrained("{repo}")']
    else:
        cls = "AutoModelForSeq2SeqLM" if cfg.model.arch == "seq2seq" else "AutoModelForCausalLM"
        lines += [f"from transformers import {cls}, AutoTokenizer", "",
                  f'model = {cls}.from_pretrained("{repo}", dtype="auto")', f'tok = AutoTokenizer.from_pretrained("{repo}")']
    if cfg.model.arch == "causal":
        system = [{"role": "system", "content": cfg.prompt.system}] if cfg.prompt.system else []
        lines += [f"messages = {json.dumps(system + [{'role': 'user', 'content': cfg.prompt.user or '...'}], ensure_ascii=False)}",
                  "text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
                  "# one BOS, as in training: the tokenizer adds it unless the chat template wrote it",
                  "bos = bool(tok.bos_token) and text.startswith(tok.bos_token)",
                  "inputs = tok(text, add_special_tokens=not bos, return_tensors='pt')",
                  f"out = model.generate(**inputs, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)",
                  "print(tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    lines += ["```", ""]
    if exp:
        names = ", ".join(f"`{f['file']}`" for f in exp.get("files", {}).values())
        lines += ["With llama.cpp, Ollama or LM Studio: the GGUF files " + names + " (outputs/" + cfg.run + "/export/) "
                  "carry the tokenizer and the chat template; for Ollama:", "", "```sh",
                  f"cd outputs/{cfg.run}/export && ollama create {cfg.run} -f Modelfile && ollama run {cfg.run}", "```", ""]
    lines += ["## Provenance", "", f"Recipe `{cfg.name}`, git commit {info.get('git_commit')}, trained "
              f"{info.get('time')}, evaluated {m.get('meta', {}).get('time')}; versions: "
              + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v) + "."]
    return "\n".join(lines) + "\n"


def write(cfg: Any, rp: paths.RunPaths, metrics: dict | None = None, exported: dict | None = None) -> None:
    """merged/README.md (when merged/ exists) and adapter/README.md, with loss.png beside each. Called before the
    step commits its target, so a step killed here is re-run by Make and rewrites them."""
    for kind, folder in (("adapter", rp.adapter), ("merged", rp.merged)):
        if not folder.is_dir():
            continue
        if (rp.out / "loss.png").exists():
            shutil.copyfile(rp.out / "loss.png", folder / "loss.png")
        io.atomic_write_text(folder / "README.md", render(cfg, rp, kind, metrics, exported))
