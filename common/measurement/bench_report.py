"""`make bench`'s tables: training rows, profiled steps, generation, and the ratios printed against the targets."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# This project's acceptance figures (docs/performance.md): ours against plain TRL and the reference setups' way,
# batched generation, and the CPU's memory budget. Printed met / NOT met with every run.
TARGETS = {"vs_trl": 2.0, "vs_reference": 3.0, "generation": 5.0, "peak_gb": 2.5}


# On a GPU: ours vs the faster plain-TRL row.
GPU_VS_TRL = 2.5


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def memory_column(tr: dict) -> tuple[str, str]:
    """Peak VRAM on a GPU (what limits the batch there), peak host RSS on a CPU."""
    gpu = any("peak_vram_mb" in r for r in tr.values())
    return ("peak_vram_mb", "VRAM") if gpu else ("peak_rss_mb", "RSS")


def report(res: dict) -> tuple[str, list[str]]:
    """The Markdown tables and the ratio lines."""
    tr, peak = res["training"], res["matmul_peak_gflops"]
    ours = tr.get("ours", {})
    mem_key, mem_name = memory_column(tr)
    lines = [f"# Benchmark: {res['recipe']} ({res['base_model']})", "",
             f"{res['time']}, git {res['git_commit']}; {res['machine']['cpu']}, {res['machine']['cores']} cores"
             + (f", {res['machine']['gpu']}" if "gpu" in res["machine"] else "")
             + f"; load average at start {res['machine']['load_average_at_start'][0]}.",
             f"Matmul peak measured in this run: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s. "
             f"{res['warmup']} warm-up steps, then {res['steps']} timed steps per variant "
             + (f"(best of {res['rounds']} interleaved rounds) " if res["rounds"] > 1 else "") +
             f"(the recipe's batch {res['batch_size']} x grad_accum {res['grad_accum']}; the micro column shows how "
             "each row split it).", "",
             f"| training | precision | micro x accum | s/step | non-pad tok/s | examples/s | padding | peak {mem_name} GB "
             "| MFU | tok/s vs ours |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in tr.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} ||||||||")
            continue
        rel = r["tokens_per_s"] / ours["tokens_per_s"] if ours.get("tokens_per_s") else None
        split = f"{r['micro_batch']} x {r['grad_accum']}" if "micro_batch" in r else "-"
        lines.append(f"| {name}: {r['what']} | {r['precision']} | {split} | {fmt(r['s_per_step'])} "
                     f"| {fmt(r['tokens_per_s'], 1)} "
                     f"| {fmt(r['examples_per_s'])} | {r['padding_share']:.0%} | {r[mem_key] / 1024:.2f} "
                     f"| {r['mfu']:.1%} | {fmt(rel)}x |")
    if res["rounds"] > 1:
        lines += ["", "Seconds/step in each round (the table keeps the best): " + "; ".join(
            f"{name} {', '.join(fmt(x) for x in r.get('s_per_step_by_round', []))}" for name, r in tr.items()) + "."]
    lines += profile_table(tr)
    g = res.get("generation", {})
    if "error" in g:
        lines += ["", f"Generation benchmark failed: {g['error']}"]
    elif g:
        lines += ["", f"| generation ({g['samples']} prompts, greedy, up to {g['max_new_tokens']} new tokens, "
                      f"{g['precision']}) | batch | seconds | samples/s | output tok/s |", "|---|---:|---:|---:|---:|"]
        for name in ("batched", "one_at_a_time", "batched_8"):
            if name not in g:
                continue
            x = g[name]
            label = name.replace("_", " ").replace("batched 8", "batched at 8, for comparison")
            lines.append(f"| {label} | {x['batch_size']} | {fmt(x['seconds'], 1)} "
                         f"| {fmt(x['samples_per_s'], 3)} | {fmt(x['output_tokens_per_s'], 1)} |")
        lines.append(f"\nGreedy outputs identical batched vs one at a time: {g['identical_outputs']}/{g['samples']}.")
    lines += ["", "## Against the targets", ""]
    checks = res["checks"]
    lines += [f"- {c['name']}: {c['value']} (target {c['target']}) -> {'met' if c['met'] else 'NOT met'}"
              for c in checks]
    return "\n".join(lines) + "\n", [f"{c['name']}: {c['value']} (target {c['target']}) "
                                      f"{'met' if c['met'] else 'NOT met'}" for c in checks]


def profile_table(tr: dict) -> list[str]:
    """One profiled step per variant (--profile): how much the host issued and how busy the GPU was."""
    rows = {name: r["profile"] for name, r in tr.items() if "profile" in r}
    if not rows:
        return []
    gpu = any("device_kernels" in p for p in rows.values())
    out = ["", "One step per variant under torch.profiler (not timed; `top` by "
           + ("GPU kernel" if gpu else "operator") + " self time). Top-level ATen operators are what Python and "
           "autograd issue one by one" + ("; a GPU busy share well below 100% means the GPU waited for the host."
                                           if gpu else "."), "",
           "| profiled step | span ms | ATen ops | GPU kernels | GPU busy | top |", "|---|---:|---:|---:|---:|---|"]
    for name, p in rows.items():
        top = ", ".join(f"{t['name'][:48]} {t['self_ms']:.1f} ms x{t['count']}" for t in p["top"][:3])
        busy = f"{p['device_busy_ms']:,.1f} ms ({p['device_busy_share']:.0%})" if "device_busy_ms" in p else "-"
        out.append(f"| {name} | {p['span_ms']:,.1f} | {p['aten_ops']:,} | {fmt(p.get('device_kernels'))} | {busy} "
                   f"| {top} |")
    traces = [p["trace"] for p in rows.values() if p.get("trace")]
    if traces:
        out += ["", f"Traces (open in ui.perfetto.dev): {Path(traces[0]).parent}/"]
    return out


def ratio_checks(res: dict) -> list[dict]:
    tr, g = res["training"], res.get("generation", {})
    ours = tr.get("ours", {})
    checks = []

    def ratio(name: str, other: str, key: str, target: float) -> None:
        o = tr.get(other, {})
        if ours.get(key) and o.get(key):
            r = ours[key] / o[key]
            checks.append({"name": name, "value": f"{r:.2f}x", "target": f">= {target}x", "met": r >= target})

    gpu = "gpu" in res["machine"]
    vs_trl = GPU_VS_TRL if gpu else TARGETS["vs_trl"]
    trl = max((k for k in ("trl-defaults", "trl-defaults-fp32") if tr.get(k, {}).get("tokens_per_s")),
              key=lambda k: tr[k]["tokens_per_s"], default=None)
    if trl:
        ratio(f"training tokens/s, ours vs {trl} (the faster TRL row)", trl, "tokens_per_s", vs_trl)
        ratio(f"training examples/s, ours vs {trl}", trl, "examples_per_s", vs_trl)
    ratio("training tokens/s, ours vs reference", "reference", "tokens_per_s", TARGETS["vs_reference"])
    if g.get("speedup"):
        ok = g["identical_outputs"] == g["samples"]
        checks.append({"name": "generation samples/s, batched vs one at a time", "value": f"{g['speedup']:.2f}x",
                       "target": f">= {TARGETS['generation']}x", "met": g["speedup"] >= TARGETS["generation"]})
        checks.append({"name": "greedy outputs identical", "value": f"{g['identical_outputs']}/{g['samples']}",
                       "target": "all", "met": ok})
    mem_key, mem_name = memory_column(tr)
    if ours.get(mem_key) and not gpu:  # the CPU's budget; on a GPU make gpu-check's capped runs say what fits
        gb = ours[mem_key] / 1024
        checks.append({"name": f"peak memory while training (ours, {mem_name})", "value": f"{gb:.2f} GB",
                       "target": f"<= {TARGETS['peak_gb']} GB", "met": gb <= TARGETS["peak_gb"]})
    return checks
