"""The gpu-check report: why a part failed (its exception's last line), every bench figure and make plan's error on
each `ours` row, as Markdown."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def last_error_line(text: str) -> str:
    """The line that says why a part failed: pytest's first FAILED/ERROR summary line, else the last `error:` line
    of a step, else the last Python exception line, else make's last `***` line, else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat, first in ((r"^(FAILED|ERROR) \S+", True), (r"^error: ", False),
                       (r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", False), (r"\*\*\* ", False)):
        hits = [ln for ln in lines if re.search(pat, ln)]
        if hits:
            return _exception_tail(hits[0] if first else hits[-1])[:300]
    return (lines[-1] if lines else "no output")[:300]


def _exception_tail(line: str) -> str:
    """make's $(error ...) flattens a traceback onto one line: keep its last exception."""
    if "Traceback" not in line:
        return line
    hits = list(re.finditer(r"\b[A-Za-z_][\w.]*(Error|Exception): ", line))
    return line[hits[-1].start():] if hits else line



ROW_KEYS = ("micro_batch", "grad_accum", "precision", "s_per_step", "tokens_per_s", "examples_per_s",
            "padding_share", "peak_vram_mb", "peak_vram_reserved_mb", "peak_rss_mb", "mfu")


def bench_figures(f: Path) -> dict | None:
    """Every figure of one bench JSON the report keeps (small: no traces, no per-example answers)."""
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    rows = {}
    for name, r in res.get("training", {}).items():
        if "error" in r:
            rows[name] = {"error": r["error"]}
            continue
        row = {k: r[k] for k in ROW_KEYS if k in r}
        prof = r.get("profile") or {}
        for k in ("device_busy_share", "device_busy_ms", "span_ms", "aten_ops", "device_kernels"):
            if k in prof:
                row[f"profile_{k}"] = prof[k]
        rows[name] = row
    gen = res.get("generation") or {}
    g = {"error": gen["error"]} if "error" in gen else {
        k: gen[k] for k in ("samples", "max_new_tokens", "precision", "speedup", "identical_outputs") if k in gen}
    for name in ("batched", "one_at_a_time", "batched_8"):
        if name in gen:
            g[name] = {k: gen[name][k] for k in ("batch_size", "seconds", "samples_per_s", "output_tokens_per_s")
                       if k in gen[name]}
    return {"run": res.get("run"), "gpu": res.get("machine", {}).get("gpu") or res.get("machine", {}).get("cpu"),
            "matmul_peak_gflops": res.get("matmul_peak_gflops"), "training": rows, "generation": g,
            "checks": res.get("checks", [])}


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _planned(p: dict | None) -> str:
    """make plan's predicted peak and its error against the row's measured one (what it compared)."""
    if not p:
        return "- | -"
    if "error" in p and p.get("predicted_gb") is None:
        return f"- | {p['error'].replace('|', '/')}"
    err = "-" if p["error"] is None else f"{p['error'] * 100:+.0f}% vs {p['measured_gb']:.2f} {p['compared']}"
    return f"{p['predicted_gb']:.2f} | {err}"


def markdown(rep: dict) -> str:
    """The report: one table of parts, then each bench's figures with the GPU named."""
    n = {s: sum(r["status"] == s for r in rep["parts"]) for s in ("passed", "failed", "overran", "validated",
                                                                  "skipped")}
    lines = [f"# gpu-check: {rep['label']}", "",
             f"{rep['time']}, git {rep['git_commit']}; {rep['elapsed_s']:.0f} s of a {rep['budget_s']:.0f} s budget; "
             + ", ".join(f"{v} {k}" for k, v in n.items() if v) + ".", "",
             "| part | result | elapsed s | budget s | what |", "|---|---|---:|---:|---|"]
    for r in rep["parts"]:
        res = r["status"] + (f": {r['error']}" if r.get("error") else "") + \
            (f" ({r['pytest']})" if r.get("pytest") and not r.get("error") else "")
        lines.append(f"| {r['name']} | {res.replace('|', '/')} | {r['elapsed_s']:.1f} | {r['budget_s']:.0f} "
                     f"| {r['what']} |")
    for part, b in rep["benches"].items():
        lines += ["", f"## {part}: {b['run']} on {b['gpu']}", "",
                  f"Matmul peak in the same run: {b['matmul_peak_gflops']} GFLOP/s.", "",
                  ("| row | precision | micro x accum | s/step | non-pad tok/s | vs ours | padding | peak GB "
                   "| MFU | GPU busy | planned GB | planner error |"), "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ours = b["training"].get("ours", {}).get("tokens_per_s")
        for name, r in b["training"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {str(r['error']).replace('|', '/')} |||||||||||")
                continue
            mem = r.get("peak_vram_mb", r.get("peak_rss_mb"))
            busy = r.get("profile_device_busy_share")
            lines.append(
                f"| {name} | {r.get('precision', '-')} | {r.get('micro_batch', '-')} x {r.get('grad_accum', '-')} "
                f"| {_f(r.get('s_per_step'), 3)} | {_f(r.get('tokens_per_s'))} "
                f"| {_f(r['tokens_per_s'] / ours, 2) if ours and r.get('tokens_per_s') else '-'}x "
                f"| {_f(r.get('padding_share', 0) * 100, 0)}% | {_f(mem / 1024 if mem else None, 2)} "
                f"| {_f(r.get('mfu', 0) * 100, 1)}% | {_f(busy * 100, 0) + '%' if busy is not None else '-'} "
                f"| {_planned(r.get('planner'))} |")
        g = b["generation"]
        if g.get("error"):
            lines += ["", f"Generation failed: {g['error']}"]
        elif g:
            lines += ["", f"Generation ({g.get('samples')} prompts, up to {g.get('max_new_tokens')} new tokens, "
                          f"{g.get('precision')}): " + "; ".join(
                              f"{k.replace('_', ' ')} batch {v['batch_size']}: {_f(v['samples_per_s'], 3)} samples/s"
                              for k, v in g.items() if isinstance(v, dict))
                      + f"; identical greedy outputs {g.get('identical_outputs')}/{g.get('samples')}."]
        if b["checks"]:
            lines += [""] + [f"- {c['name']}: {c['value']} (target {c['target']}) -> "
                             f"{'met' if c['met'] else 'NOT met'}" for c in b["checks"]]
    return "\n".join(lines) + "\n"




def planner_errors(figures: dict, flags: str, home: Path, gpu_memory_gb: float | None) -> None:
    """make plan's prediction beside every `ours` row of one bench (figures, in place): the row's recipe flags (a
    part's checks), its own overrides, micro-batch, precision and quantization, and the lengths of the split it
    trained on (the part's artifact root). Compared: GPU max reserved + the context (and allocated), else peak RSS."""
    import os
    import shlex
    from dataclasses import replace

    from common.core import config
    from common.measurement import bench_rows
    from common.training import footprint, shapes
    from common.training.plan import Plan

    argv = shlex.split(flags)
    recipe, sets = argv[argv.index("--recipe") + 1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    before = os.environ.get("FT_HOME")
    os.environ["FT_HOME"] = str(home)  # the prepared split's lengths, as the part prepared them
    try:
        base = config.load(recipe, sets, tiny="--tiny" in argv)
        ours = figures["training"].get("ours", {})
        gpu = gpu_memory_gb is not None
        plan = Plan("cuda" if gpu else "cpu", ours.get("precision", "fp32"), base.quantization.bits, base.train.optim,
                    padding_free=gpu and base.model.arch == "causal")
        specs = bench_rows.variants(base, plan)
        for name, row in figures["training"].items():
            if "error" in row or specs.get(name, {}).get("kind") != "ours":
                continue
            try:
                cfg = config.load(recipe, [*sets, *specs[name]["sets"]], tiny="--tiny" in argv)
                cap = cfg.runtime.gpu_memory_gb or gpu_memory_gb
                st = footprint.setting(cfg, f"{cap:g}GB" if gpu else "cpu")
                st = replace(st, precision=row.get("precision", st.precision),
                             quant_bits=row.get("quantization_bits", st.quant_bits))
                m = footprint.memory(cfg, shapes.shape_of(cfg), st, row.get("micro_batch") or st.micro)
            except Exception as e:  # noqa: BLE001 (one row the planner cannot size is reported, not fatal)
                row["planner"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            if gpu and row.get("peak_vram_reserved_mb"):
                measured = row["peak_vram_reserved_mb"] / 1024 + footprint.device_info(st.device)[4]
                p = {"compared": "reserved+context", "measured_gb": round(measured, 2), "predicted_gb": m["peak"],
                     "allocated_gb": round(row.get("peak_vram_mb", 0) / 1024, 2), "predicted_allocated_gb": m["allocated"]}
            else:
                p = {"compared": "rss", "measured_gb": round(row.get("peak_rss_mb", 0) / 1024, 2), "predicted_gb": m["peak"]}
            p["error"] = round(p["predicted_gb"] / p["measured_gb"] - 1, 3) if p["measured_gb"] else None
            p["fits_predicted"] = m["peak"] <= (cap if gpu else 1e9)
            p["tokens"], p["lengths_from"] = m["tokens"], st.length_source
            row["planner"] = p
    finally:
        if before is None:
            os.environ.pop("FT_HOME", None)
        else:
            os.environ["FT_HOME"] = before
