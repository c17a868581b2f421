"""The sweep report: each run against the sweep's best run on val by paired verdicts, and the recommendation.

Every run is read from its own files: eval/val_scores.csv (the tuned model's per-example score on each val
example), eval/metrics.json (test's primary metric, verdict against the strongest baseline, forgetting change),
eval/side_by_side.csv (the test examples, checked to be the same for every run), tuned_generations.jsonl (the
tuned model's loss on each general-text passage) and adapter/run_info.json (train time summed over resumed
segments, peak memory). The best run and its ties are chosen on VAL, never on test: picking the best of several on
test would favour it by chance, and test then reports the chosen run once. The best run has the highest mean
per-example val score; every run gets its paired 95% CI against it on the same val examples, and the runs it cannot
tell from the best (the CI holds 0, or too few examples differ for a verdict: common/evaluation/metrics.py) are
ties, each with roughly how many val examples would resolve a difference of its size. No run is ranked by a point
estimate alone: among the ties, the least-forgetting run (lowest general-text loss) and those not distinguishable
from it on the same passages are kept, and the one with the shortest training among them is the recommendation.
"""
from __future__ import annotations

import csv
import json
from io import StringIO
from pathlib import Path
from typing import Any

from common.core import io, paths
from common.evaluation import metrics


def _per_example(run: str, key: str, name: str = "side_by_side.csv") -> tuple[list[str], list[float]]:
    f = paths.RunPaths(run).eval / name
    if not f.exists():
        why = ("its eval scored no val split (eval.split=val, or an eval made before val was scored: remove "
               f"{f.parent} and make sweep again)" if name == "val_scores.csv" else "make sweep again finishes the run")
        raise io.UserError(f"{f} does not exist: {why}")
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
    ids, _ = _per_example(run, key)
    val_ids, scores = _per_example(run, key, "val_scores.csv")
    return {"run": run, "metrics": m, "ids": ids, "val_ids": val_ids, "scores": scores, "general": _general_losses(run),
            "train_seconds": info.get("train_seconds"), "peak_rss_mb": info.get("peak_rss_mb"),
            "peak_gpu_mb": info.get("peak_gpu_mb")}


def compare(runs: list[dict], n_boot: int) -> dict:
    """The best run on val, the ties and the recommendation with its reason (each run gets vs_best and tie)."""
    first = runs[0]
    for r in runs[1:]:
        for ids, what in (("ids", "test"), ("val_ids", "val")):
            if r[ids] != first[ids]:
                raise io.UserError(f"runs {first['run']} and {r['run']} were evaluated on different {what} examples; "
                                   f"a sweep varies only settings that keep the val and test examples")
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
    return {"chosen_on": f"val ({len(best['scores'])} examples)", "best": best["run"], "ties": [r["run"] for r in ties],
            "least_forgetting": [r["run"] for r in kept], "recommended": rec["run"],
            "reason": reason(rec, best, ties, kept, least)}


def reason(rec: dict, best: dict, ties: list[dict], kept: list[dict], least: dict) -> str:
    """The recommendation in one sentence, with what it keeps and what it still costs."""
    m = rec["metrics"]
    key = m["comparison"]["per_example"]
    n = len(best["scores"])
    if rec is best:
        first = f"{rec['run']} has the best mean {key} on val ({n} examples)"
    else:
        v = rec["vs_best"]
        first = (f"{rec['run']} cannot be told from the best run on val ({n} examples), {best['run']}, on {key} "
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
    return (f"{first}; {second}. On test ({m['n_examples']} examples, reported once for the chosen run) against "
            f"{against} it is {metrics.VERDICT_WORDS[v['verdict']]} it ({v['mean']:+.4f} [{v['ci_low']:+.4f}, "
            f"{v['ci_high']:+.4f}]); on general text it is {metrics.VERDICT_WORDS[f['verdict']]} the base model "
            f"({f['mean']:+.4f} [{f['ci_low']:+.4f}, "
            f"{f['ci_high']:+.4f}]).")


COLUMNS = ["run", "primary_metric", "val_tuned", "vs_best", "vs_best_ci_low", "vs_best_ci_high",
           "val_examples_to_resolve", "tie", "tuned",
           "strongest_baseline", "vs_baseline", "vs_baseline_ci_low", "vs_baseline_ci_high", "verdict",
           "forgetting", "forgetting_ci_low", "forgetting_ci_high", "forgetting_verdict", "general_loss",
           "train_seconds", "peak_rss_mb", "peak_gpu_mb", "recommended"]


def rows(runs: list[dict], grid_keys: list[str], settings: dict[str, dict], result: dict) -> list[dict]:
    out = []
    for r in runs:
        m, b, v, f = r["metrics"], r["vs_best"], r["metrics"]["verdict"], r["metrics"]["forgetting"]
        row = {"run": r["run"], **{k: settings[r["run"]][k] for k in grid_keys}, "primary_metric": m["primary_metric"],
               "val_tuned": sum(r["scores"]) / len(r["scores"]), "vs_best": b["mean"], "vs_best_ci_low": b["ci_low"],
               "vs_best_ci_high": b["ci_high"], "val_examples_to_resolve": b.get("examples_to_resolve"),
               "tie": r["tie"], "tuned": m["tuned"][m["primary_metric"]],
               "strongest_baseline": m.get("strongest_baseline"),
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
             f"**The best run and its ties are chosen on {result['chosen_on']}, never on test.** Each run's "
             f"{n['primary_metric']} on val is paired with the best run's ({result['best']}) on the same val examples "
             "with a 95% bootstrap CI; a run whose CI holds 0 is a tie, and \"val n\" is roughly how many val examples "
             "would resolve a difference of that size (80% power). The test columns are each run's own test result, "
             "not used to choose: the recommended run's is the sweep's result. The verdict is against the strongest "
             "baseline; forgetting is the change in general-text loss per token (tuned - base, lower is better).", "",
             "| run | " + " | ".join(grid_keys) + f" | val {n['primary_metric']} | val vs best [95% CI] | val n | "
             f"tie | test {n['primary_metric']} | test vs strongest baseline [95% CI] | forgetting [95% CI] | train s | "
             "peak RAM MB |",
             "|---|" + "---|" * len(grid_keys) + "---|---|---|---|---|---|---|---|---|"]
    for r in table:
        mark = " **(recommended)**" if r["recommended"] else ""
        lines.append(
            f"| {r['run']}{mark} | " + " | ".join(str(r[k]) for k in grid_keys) + f" | {r['val_tuned']:.4f} | "
            f"{_f(r['vs_best'])} [{_f(r['vs_best_ci_low'])}, {_f(r['vs_best_ci_high'])}] | "
            f"{_num(r['val_examples_to_resolve'])} | {'yes' if r['tie'] else 'no'} | {r['tuned']:.4f} | "
            f"{r['verdict']} {r['strongest_baseline'] or 'base'}: "
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
