"""One page across every run under the artifact root: outputs/summary.csv and a self-contained outputs/report.html.

A run is a folder outputs/<run>/ with eval/metrics.json. The page shows, per run: task, base model, every metric for
base, tuned and each of the task's baselines; the verdict against the strongest baseline and every paired
comparison (tuned vs base, vs each baseline) with its 95% CI; the forgetting check (general-text loss before and
after, paired); for a task with pairs, preference accuracy (start, tuned, the longer answer) and the training
log's rewards/* curves (inline SVG) with a sentence when they show DPO's usual shape; stop rates, train time and
speed, peak memory, the loss curve (embedded as a data: URI, so the file opens from disk or an e-mail), five
side-by-side examples and relative links to the run's files; above the runs, each sweep's table and recommendation
(outputs/sweeps/<name>/sweep.json, make sweep). Each figure cell carries data-run / data-key attributes, so a test
(or a script) can read the numbers back from the page.
"""
from __future__ import annotations

import base64
import csv
import html
import logging
from io import StringIO
from pathlib import Path
from typing import Any

from common.core import io, paths
from common.evaluation import preference

log = logging.getLogger("ft")

COLUMNS = ["run", "recipe", "tiny_mode", "task", "base_model", "primary_metric", "base", "tuned", "difference",
           "ci_low", "ci_high", "vs_base", "strongest_baseline", "vs_baseline", "vs_baseline_ci_low",
           "vs_baseline_ci_high", "verdict", "headline_against", "general_loss_base", "general_loss_tuned", "forgetting",
           "base_stop_rate", "tuned_stop_rate", "n_examples", "train_seconds",
           "train_tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "device", "git_commit", "evaluated", "preference_start",
           "preference_tuned", "preference_verdict",  # these three: a task with pairs (preference accuracy)
           "peak_vs_plan"]  # measured peak / make plan's prediction
PAGE_COLUMNS = COLUMNS[:COLUMNS.index("forgetting") + 1]  # the overview table; summary.csv has them all


def runs(root: Path) -> list[Path]:
    """Run folders with an evaluation in today's format, by name; one evaluated by an older version (no verdict
    against the baselines) is left out with a note: `make eval` for it writes today's format."""
    out = []
    for p in sorted(root.glob("*/eval/metrics.json")):
        if "verdict" in (io.read_json(p, {}) or {}):
            out.append(p.parent.parent)
        else:
            log.warning("%s: evaluated by an older version of this project, left out; run make eval for it", p)
    return out


def summary_row(run: Path) -> dict:
    m = io.read_json(run / "eval" / "metrics.json")
    info = io.read_json(run / "adapter" / "run_info.json", {})
    meta, c, key = m.get("meta", {}), m["comparison"], m["primary_metric"]
    v, f, best = m["verdict"], m["forgetting"], m.get("strongest_baseline")
    b = m["vs_baselines"][best] if best else {}
    pref = m.get("preference_accuracy") or {}
    return {"run": run.name, "recipe": meta.get("recipe"), "tiny_mode": meta.get("tiny_mode"), "task": m.get("task"),
            "base_model": meta.get("base_model"), "primary_metric": key, "base": m["base"][key],
            "tuned": m["tuned"][key], "difference": c["mean"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
            "vs_base": c["verdict"], "strongest_baseline": m.get("strongest_baseline"),
            "vs_baseline": b.get("mean"), "vs_baseline_ci_low": b.get("ci_low"),
            "vs_baseline_ci_high": b.get("ci_high"), "verdict": v["verdict"], "headline_against": v["against"],
            "general_loss_base": f["base_loss"], "general_loss_tuned": f["tuned_loss"], "forgetting": f["verdict"],
            "base_stop_rate": m["base"].get("stop_rate"), "tuned_stop_rate": m["tuned"].get("stop_rate"),
            "n_examples": m["n_examples"], "train_seconds": info.get("train_seconds"),
            "train_tokens_per_s": info.get("train_tokens_per_second"),
            "peak_rss_mb": info.get("peak_rss_mb"), "peak_gpu_mb": info.get("peak_gpu_mb"),
            "device": (info.get("hardware") or {}).get("name") or info.get("plan", {}).get("device"),
            "git_commit": meta.get("git_commit"), "evaluated": meta.get("time"),
            "preference_start": pref.get("start"), "preference_tuned": pref.get("tuned"),
            "preference_verdict": pref.get("verdict"),
            "peak_vs_plan": (m.get("peak_memory") or {}).get("measured_over_predicted")}


def fmt(v: Any) -> str:
    """How a number is shown on the page (and what the test expects): 4 decimals for floats."""
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _num(v: Any) -> str:
    """Seconds, tokens/s, MB: whole numbers with thousands separators."""
    return "–" if v is None else f"{v:,.0f}"


def _cell(run: str, key: str, v: Any) -> str:
    return f'<td data-run="{html.escape(run)}" data-key="{html.escape(key)}">{html.escape(fmt(v))}</td>'


def _examples(run: Path, n: int = 5) -> list[dict]:
    f = run / "eval" / "side_by_side.csv"
    if not f.exists():
        return []
    with open(f, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))[:n]


def _image(f: Path) -> str:
    if not f.exists():
        return "<p>(no loss curve)</p>"
    data = base64.b64encode(f.read_bytes()).decode()
    return f'<img alt="loss curve" src="data:image/png;base64,{data}">'


def _links(run: Path, root: Path) -> str:
    wanted = ["eval/report.md", "eval/metrics.json", "eval/side_by_side.csv", "adapter/README.md", "merged/README.md",
              "merge_report.json", "export/export_report.json", "export/Modelfile", "train_log.csv",
              "eval/preference_pairs.csv"]
    items = [f'<a href="{html.escape(str((run / w).relative_to(root)))}">{html.escape(w)}</a>'
             for w in wanted if (run / w).exists()]
    return " · ".join(items)


def _span(run: str, key: str, v: Any) -> str:
    return f'<span data-run="{html.escape(run)}" data-key="{html.escape(key)}">{html.escape(fmt(v))}</span>'


def _verdict(run: str, m: dict) -> str:
    """The headline: tuned against the strongest alternative (the strongest baseline or the base model)."""
    v, best = m["verdict"], m.get("strongest_baseline")
    who = (f"the strongest baseline, <code>{html.escape(best)}</code>" if v["against"] != "base" else
           "the base model" + (f" (above every baseline, the strongest <code>{html.escape(best)}</code>)"
                               if best else ""))
    return (f"<p><b>Verdict, tuned vs {who}: {_span(run, 'verdict.verdict', v['verdict'])}</b> on {html.escape(v['metric'])} "
            f"({_span(run, 'verdict.mean', v['mean'])}, 95% CI [{_span(run, 'verdict.ci_low', v['ci_low'])}, "
            f"{_span(run, 'verdict.ci_high', v['ci_high'])}])</p>")


def _comparisons(run: str, m: dict) -> str:
    """Every paired comparison of the primary metric: tuned - base, tuned - each baseline."""
    rows = [("base model", "comparison", m["comparison"])] + [
        (f"baseline {b}", f"vs_baselines.{b}", c) for b, c in m.get("vs_baselines", {}).items()]
    out = ["<table><tr><th>tuned vs</th><th>difference</th><th>95% CI low</th><th>95% CI high</th><th>verdict</th>"
           "<th>examples to resolve</th></tr>"]
    for label, key, c in rows:
        out.append(f"<tr><td>{html.escape(label)}</td>" + "".join(
            _cell(run, f"{key}.{k}", c.get(k)) for k in ("mean", "ci_low", "ci_high", "verdict", "examples_to_resolve"))
                   + "</tr>")
    return "".join(out) + "</table>"


def _forgetting(run: str, f: dict) -> str:
    warn = " — <b>the tuned model forgot some general ability</b>" if f["verdict"] == "worse" else ""
    return (f"<p>general-text loss per token ({f['passages']} passages, lower is better): base "
            f"{_span(run, 'forgetting.base_loss', f['base_loss'])}, tuned "
            f"{_span(run, 'forgetting.tuned_loss', f['tuned_loss'])}, change {_span(run, 'forgetting.mean', f['mean'])}"
            f", 95% CI [{_span(run, 'forgetting.ci_low', f['ci_low'])}, "
            f"{_span(run, 'forgetting.ci_high', f['ci_high'])}]: "
            f"{_span(run, 'forgetting.verdict', f['verdict'])}{warn}</p>")


def _preference(run: str, p: dict) -> str:
    """A task with pairs: preference accuracy of the starting and the tuned model, the baseline, the paired verdict."""
    sp = lambda key: _span(run, "preference_accuracy." + key, p.get(key))  # noqa: E731 (one figure of the record)
    margin = ("" if p.get("mean_reward_margin") is None
              else f"; mean reward margin (beta {p['beta']:g}) {sp('mean_reward_margin')}")
    return (f"<p>preference accuracy on {p['n']} held-out pairs (share where the chosen answer is the more likely): "
            f"start {sp('start')}, tuned {sp('tuned')}, the longer answer {sp('longer')}; tuned - start {sp('mean')}, "
            f"95% CI [{sp('ci_low')}, {sp('ci_high')}]: <b>{sp('verdict')}</b>{margin}</p>")


COLORS = {"rewards/chosen": "#1f77b4", "rewards/rejected": "#d62728", "rewards/margins": "#2ca02c",
          "rewards/accuracies": "#9467bd"}


def _plot(series: dict[str, list[tuple[int, float]]], title: str, span: tuple[float, float] = (0.0, 0.0),
          w: int = 360, h: int = 180) -> str:
    """An inline SVG line chart of (step, value) series, its y axis covering `span` and every value: the page stays
    one file, no image library needed."""
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y0, y1 = min(min(y for _, y in pts), span[0]), max(max(y for _, y in pts), span[1])
    sx = lambda x: 40 + (w - 50) * (x - x0) / ((x1 - x0) or 1)  # noqa: E731 (two short scales)
    sy = lambda y: h - 25 - (h - 40) * (y - y0) / ((y1 - y0) or 1)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{title}">',
           f'<text x="{w / 2}" y="12" text-anchor="middle" font-size="11">{html.escape(title)}</text>',
           f'<line x1="40" x2="{w - 10}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#bbb"/>',
           f'<text x="36" y="{sy(y1) + 4:.1f}" text-anchor="end" font-size="9">{y1:.3g}</text>',
           f'<text x="36" y="{sy(y0):.1f}" text-anchor="end" font-size="9">{y0:.3g}</text>',
           f'<text x="{w - 10}" y="{h - 5}" text-anchor="end" font-size="9">step {x1}</text>']
    for i, (name, s) in enumerate(series.items()):
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out += [f'<polyline data-series="{html.escape(name)}" fill="none" stroke="{COLORS.get(name, "#333")}" '
                f'stroke-width="1.5" points="{line}"/>',
                f'<text x="{44 + 80 * i}" y="{h - 5}" font-size="9" fill="{COLORS.get(name, "#333")}">'
                f'{html.escape(name.split("/")[-1])}</text>']
    return "".join(out) + "</svg>"


def _rewards(run: Path) -> str:
    """A preference run's rewards/* curves from train_log.csv, with the plain sentence on DPO's usual shape."""
    curves = preference.reward_curves(run / "train_log.csv")
    if not curves:
        return ""
    rewards = {k: v for k, v in curves.items() if k != "rewards/accuracies"}
    acc = {k: v for k, v in curves.items() if k == "rewards/accuracies"}
    shape = preference.usual_shape(curves)
    return ('<div class="rewards">' + (_plot(rewards, "implicit rewards (train)") if rewards else "")
            + (_plot(acc, "reward accuracy (train)", (0.0, 1.0)) if acc else "") + "</div>"
            + (f'<p data-run="{html.escape(run.name)}" data-key="rewards.shape">{html.escape(shape)}.</p>'
               if shape else ""))


def section(run: Path, root: Path) -> str:
    m = io.read_json(run / "eval" / "metrics.json")
    row = summary_row(run)
    name = run.name
    e = html.escape
    names = list(m.get("baselines", {}))
    out = [f'<section id="{e(name)}"><h2>{e(name)}</h2>',
           f"<p>task <b>{e(str(row['task']))}</b>, base model <code>{e(str(row['base_model']))}</code>"
           + (" — <b>tiny-model test run (random-init stand-in)</b>" if row["tiny_mode"] else "") + "</p>",
           _verdict(name, m),
           "<table><tr><th>metric</th><th>base</th><th>tuned</th>" + "".join(f"<th>{e(b)}</th>" for b in names)
           + "</tr>"]
    for k, v in m["tuned"].items():
        out.append(f"<tr><td>{e(k)}</td>{_cell(name, 'base.' + k, m['base'].get(k))}{_cell(name, 'tuned.' + k, v)}"
                   + "".join(_cell(name, f"baselines.{b}.{k}", m["baselines"][b].get(k)) for b in names) + "</tr>")
    out += ["</table>", _comparisons(name, m),
            (_preference(name, m["preference_accuracy"]) if "preference_accuracy" in m else ""),
            _forgetting(name, m["forgetting"]),
            ("<p><b>the tuned model does not stop</b></p>" if m.get("tuned_does_not_stop") else ""),
            f"<p>training: {_num(row['train_seconds'])} s, {_num(row['train_tokens_per_s'])} tokens/s, peak "
            f"{_num(row['peak_rss_mb'])} MB RAM" + (f", {_num(row['peak_gpu_mb'])} MB GPU" if row["peak_gpu_mb"] else "")
            + f" on {e(str(row['device']))}</p>",
            (f"<p>{e(m['peak_memory']['line'])}</p>" if m.get("peak_memory") else ""),  # make plan's check
            _image(run / "loss.png"), _rewards(run), "<h3>Examples</h3>",
            "<table><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>"]
    for ex in _examples(run):
        out.append("<tr>" + "".join(f"<td>{e(ex.get(k, ''))}</td>" for k in ("prompt", "reference", "base", "tuned"))
                   + "</tr>")
    out += ["</table>", f"<p>files: {_links(run, root)}</p>", "</section>"]
    return "\n".join(out)


def sweeps(root: Path) -> list[dict]:
    """Every sweep report (outputs/sweeps/<name>/sweep.json, written by make sweep), by name."""
    return [io.read_json(f) for f in sorted(root.glob("sweeps/*/sweep.json"))]


def sweep_section(s: dict) -> str:
    """One sweep: its grid, the recommendation with its reason, and a row per run (figures readable by data-run /
    data-key, as in the run sections)."""
    e, keys = html.escape, s["grid_keys"]
    cols = ["val_tuned", "vs_best", "vs_best_ci_low", "vs_best_ci_high", "val_examples_to_resolve", "tie", "tuned", "verdict", "vs_baseline", "forgetting",
            "forgetting_ci_low", "forgetting_ci_high", "forgetting_verdict", "train_seconds", "peak_rss_mb"]
    out = [f'<section id="sweep-{e(s["name"])}"><h2>Sweep {e(s["name"])}</h2><p>{e(s["grid"])}</p>',
           f"<p><b>Recommendation: {e(s['recommended'])}.</b> {e(s['reason'])}</p>",
           "<table><tr><th>run</th>" + "".join(f"<th>{e(c)}</th>" for c in keys + cols) + "</tr>"]
    for r in s["rows"]:
        out.append(f'<tr><td><a href="#{e(r["run"])}">{e(r["run"])}</a></td>'
                   + "".join(_cell(r["run"], f"sweep.{c}", r[c]) for c in keys + cols) + "</tr>")
    return "\n".join(out + ["</table></section>"])


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;font-size:90%}"
         "img{max-width:40em}section{margin-top:2.5em}")


def build(root: Path) -> tuple[str, str, int]:
    """(summary.csv text, report.html text, number of runs) for the runs under `root` (outputs/)."""
    found = runs(root)
    rows = [summary_row(r) for r in found]
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in PAGE_COLUMNS)
    body = "".join("<tr>" + "".join(
        (f'<td><a href="#{html.escape(r["run"])}">{html.escape(r["run"])}</a></td>' if c == "run"
         else _cell(r["run"], "summary." + c, r[c])) for c in PAGE_COLUMNS) + "</tr>" for r in rows)
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>Fine-tuning runs</title>"
            f"<style>{STYLE}</style></head><body><h1>Fine-tuning runs ({len(rows)})</h1>"
            f"<p>Every run under <code>{html.escape(str(root))}</code> with an evaluation. Full columns: summary.csv.</p>"
            f"<table><tr>{head}</tr>{body}</table>" + "".join(sweep_section(s) for s in sweeps(root))
            + "".join(section(r, root) for r in found) + "</body></html>\n")
    return buf.getvalue(), page, len(rows)


def write() -> int:
    root = paths.home() / "outputs"
    text, page, n = build(root)
    io.atomic_write_text(paths.summary_csv(), text)
    io.atomic_write_text(paths.report_html(), page)
    return n
