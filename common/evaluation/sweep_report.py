"""The sweep report: each run of a sweep against the sweep's best run by paired verdicts, and the recommendation.

Every run is read from its own files: eval/metrics.json (primary metric, verdict against the strongest baseline,
forgetting change), eval/side_by_side.csv (the per-example score of each test example), tuned_generations.jsonl
(the tuned model's loss on each general-text passage) and adapter/run_info.json (train time, peak memory). The best
run has the highest mean per-example score, the one the paired CI is computed on; every run gets its paired 95% CI
against it on the same test examples, and the runs it cannot tell from the best (the CI holds 0, or too few
examples differ for a verdict: common/evaluation/metrics.py) are ties. No run is ranked by a point estimate
alone: among the ties, the least-forgetting run (lowest general-text loss) and those not distinguishable from it
on the same passages are kept, and the one with the shortest training among them is the recommendation.
"""
from __future__ import annotations

import csv
import json
from io import StringIO
from pathlib import Path
from typing import Any

from common.core import io, paths
from common.evaluation import metrics


def _per_example(run: str, key: str) -> tuple[list[str], list[float]]:
    f = paths.RunPaths(run).eval / "side_by_side.csv"
    if not f.exists():
        raise io.UserError(f"{f} does not exist; make the run first (make sweep goes on from where it stopped)")
    with open(f, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["id"] for r in rows], [float(r[f"tuned_{key}"]) for r in rows]


def _general_losses(run: str) -> list[float]:
    cache = paths.RunPaths(run).tuned_cache
    rows = io.read_jsonl(cache)
    return rows[1]["general_losses"]


def read_run(run: str) -> dict:
    """One run's figures from its own files."""
    rp = paths.RunPaths(run)
    m = io.read_json(rp.eval / "metrics.json", None)
    if not m:
        raise io.UserError(f"{rp.eval / 'metrics.json'} does not exist; make sweep again finishes the run")
    info = io.read_json(rp.adapter / "run_info.json", {})
    key = m["comparison"]["per_example"]
    ids, scores = _per_example(run, key)
    return {"run": run, "metrics": m, "ids": ids, "scores": scores, "general": _general_losses(run),
            "train_seconds": info.get("train_seconds"), "peak_rss_mb": info.get("peak_rss_mb"),
            "peak_gpu_mb": info.get("peak_gpu_mb")}


def compare(runs: list[dict], n_boot: int) -> dict:
    """Rows (one per run, in the given order), the best run, the ties and the recommendation with its reason."""
    first = runs[0]
    for r in runs[1:]:
        if r["ids"] != first["ids"]:
            raise io.UserError(f"runs {first['run']} and {r['run']} were evaluated on different test examples; a "
                               f"sweep varies only settings that keep the data (not data.* or eval.split)")
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    best = max(runs, key=lambda r: mean(r["scores"]))
    for r in runs:
        r["vs_best"] = metrics.paired(r["scores"], best["scores"], n_boot)
        r["tie"] = r is best or r["vs_best"]["verdict"] not in ("better", "worse")
    ties = [r for r in runs if r["tie"]]
    least = min(ties, key=lambda r: mean(r["general"]))
    for r in ties:
        r["vs_least_forgetting"] = metrics.paired(r["general"], least["general"], n_boot, higher_is_better=False)
    kept = [r for r in ties if r is least or r["vs_least_forgetting"]["verdict"] not in ("better", "worse")]
    rec = min(kept, key=lambda r: (r["train_seconds"] is None, r["train_seconds"] or 0))
    return {"best": best["run"], "ties": [r["run"] for r in ties], "least_forgetting": [r["run"] for r in kept],
            "recommended": rec["run"], "reason": reason(rec, best, ties, kept, least)}


def reason(rec: dict, best: dict, ties: list[dict], kept: list[dict], least: dict) -> str:
    """The recommendation in one sentence, with what it keeps and what it still costs."""
    m = rec["metrics"]
    key = m["comparison"]["per_example"]
    if rec is best:
        first = f"{rec['run']} has the best mean {key}"
    else:
        v = rec["vs_best"]
        first = (f"{rec['run']} cannot be told from the best run {best['run']} on {key} "
                 f"({v['mean']:+.4f}, 95% CI [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}])")
    if len(ties) == 1:
        second = "no other run is tied with it"
    elif len(kept) == 1:
        second = f"among the {len(ties)} runs tied with the best it forgets the least"
    else:
        second = (f"among the {len(ties)} runs tied with the best, {len(kept)} forget no more than the least-"
                  f"forgetting one ({least['run']}) beyond the CI, and it trains the fastest of those")
    f, v = m["forgetting"], m["verdict"]
    against = m.get("strongest_baseline") or "the base model"
    return (f"{first}; {second}. Against {against} it is {metrics.VERDICT_WORDS[v['verdict']]} it; on general text "
            f"it is {metrics.VERDICT_WORDS[f['verdict']]} the base model ({f['mean']:+.4f} [{f['ci_low']:+.4f}, "
            f"{f['ci_high']:+.4f}]).")


COLUMNS = ["run", "primary_metric", "tuned", "vs_best", "vs_best_ci_low", "vs_best_ci_high", "tie",
           "strongest_baseline", "vs_baseline", "vs_baseline_ci_low", "vs_baseline_ci_high", "verdict",
           "forgetting", "forgetting_ci_low", "forgetting_ci_high", "forgetting_verdict", "general_loss",
           "train_seconds", "peak_rss_mb", "peak_gpu_mb", "recommended"]


def rows(runs: list[dict], grid_keys: list[str], settings: dict[str, dict], result: dict) -> list[dict]:
    out = []
    for r in runs:
        m, b, v, f = r["metrics"], r["vs_best"], r["metrics"]["verdict"], r["metrics"]["forgetting"]
        row = {"run": r["run"], **{k: settings[r["run"]][k] for k in grid_keys}, "primary_metric": m["primary_metric"],
               "tuned": m["tuned"][m["primary_metric"]], "vs_best": b["mean"], "vs_best_ci_low": b["ci_low"],
               "vs_best_ci_high": b["ci_high"], "tie": r["tie"], "strongest_baseline": m.get("strongest_baseline"),
               "vs_baseline": v["mean"], "vs_baseline_ci_low": v["ci_low"], "vs_baseline_ci_high": v["ci_high"],
               "verdict": v["verdict"], "forgetting": f["mean"], "forgetting_ci_low": f["ci_low"],
               "forgetting_ci_high": f["ci_high"], "forgetting_verdict": f["verdict"], "general_loss": f["tuned_loss"],
               "train_seconds": r["train_seconds"], "peak_rss_mb": r["peak_rss_mb"], "peak_gpu_mb": r["peak_gpu_mb"],
               "recommended": r["run"] == result["recommended"]}
        out.append(row)
    return out


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:+.4f}" if isinstance(v, float) else str(v)


def markdown(name: str, describe: str, grid_keys: list[str], table: list[dict], result: dict) -> str:
    n = table[0]
    lines = [f"# Sweep {name}", "", describe + ".", "",
             f"**Recommendation: {result['recommended']}.** {result['reason']}", "",
             f"Each run's {n['primary_metric']} against the best run ({result['best']}) is paired on the same test "
             "examples with a 95% bootstrap CI; a run whose CI holds 0 is a tie. The verdict is against the strongest "
             "baseline; forgetting is the change in general-text loss per token (tuned - base, lower is better).", "",
             "| run | " + " | ".join(grid_keys) + f" | {n['primary_metric']} | vs best [95% CI] | tie | vs strongest "
             "baseline [95% CI] | forgetting [95% CI] | train s | peak RAM MB |",
             "|---|" + "---|" * len(grid_keys) + "---|---|---|---|---|---|---|"]
    for r in table:
        mark = " **(recommended)**" if r["recommended"] else ""
        lines.append(
            f"| {r['run']}{mark} | " + " | ".join(str(r[k]) for k in grid_keys) + f" | {r['tuned']:.4f} | "
            f"{_f(r['vs_best'])} [{_f(r['vs_best_ci_low'])}, {_f(r['vs_best_ci_high'])}] | "
            f"{'yes' if r['tie'] else 'no'} | {r['verdict']} {r['strongest_baseline'] or 'base'}: "
            f"{_f(r['vs_baseline'])} [{_f(r['vs_baseline_ci_low'])}, {_f(r['vs_baseline_ci_high'])}] | "
            f"{r['forgetting_verdict']}: {_f(r['forgetting'])} [{_f(r['forgetting_ci_low'])}, "
            f"{_f(r['forgetting_ci_high'])}] | {_num(r['train_seconds'])} | {_num(r['peak_rss_mb'])} |")
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:,.0f}"


def to_csv(table: list[dict]) -> str:
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    io.atomic_write_text(path, text)
    return True


def write(name: str, describe: str, grid_keys: list[str], settings: dict[str, dict], n_boot: int) -> dict:
    """Read every run, compare, and write sweep.csv, sweep.md and, last, sweep.json under outputs/sweeps/<name>/
    (a file is rewritten only when its content changed, so a sweep with nothing new changes nothing)."""
    runs = [read_run(r) for r in settings]
    result = compare(runs, n_boot)
    table = rows(runs, grid_keys, settings, result)
    d = paths.sweep_dir(name)
    summary = {"name": name, "grid": describe, "grid_keys": grid_keys, **result, "bootstrap_resamples": n_boot,
               "rows": table}
    _write_if_changed(d / "sweep.csv", to_csv(table))
    _write_if_changed(d / "sweep.md", markdown(name, describe, grid_keys, table, result))
    _write_if_changed(d / "sweep.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
