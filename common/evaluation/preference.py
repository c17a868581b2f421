"""Preference accuracy on held-out pairs: does the tuned model prefer the chosen answer more often than its start?

For a task with `pairs` (task preference) every eval row holds a prompt, a chosen and a rejected answer. Each answer
is encoded as training renders it (the chat template, the answer and its end-of-turn token scored, nothing else) and
scored by the held-out loss machinery (forgetting.losses, cached with each model's generations): its log-probability
given the prompt, summed over its tokens and per token. A model "prefers" the chosen answer of a pair when it gives
it the higher log-probability. Preference accuracy, the share of pairs it prefers, is computed for the starting
model (the base model in this release) and the tuned one, paired over the same pairs with the project's bootstrap CI
and verdict words, beside the `longer` baseline (picks the longer answer). DPO's implicit reward of a pair, with the
starting model as the reference, is beta x ((tuned - start log-prob of chosen) - (the same for rejected)); its mean
is the held-out counterpart of train_log.csv's rewards/margins. The training log's rewards/* columns and the plain
sentence about their usual shape are read here too (report.md, report.html).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import prompts
from common.evaluation import metrics

REWARD_COLUMNS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
USUAL_SHAPE = ("chosen rewards fell while margins rose: DPO's usual shape — both answers became less likely, the "
               "rejected one more so")
REFERENCE = "the starting model (the base model)"


@dataclass
class Pairs:
    """The eval rows' pairs as scored sequences: `kept` row indices and, for each, (ids, labels) of chosen then
    rejected in `sequences`; `dropped` rows have a side that train.max_length cuts to no answer token."""

    kept: list[int]
    sequences: list[tuple[list[int], list[int]]]
    dropped: int


def _answer(side: Any) -> list[dict]:
    return side if isinstance(side, list) else [{"role": "assistant", "content": str(side)}]


def text(side: Any) -> str:
    """An answer's text: the last message's content of a message list, or the string itself."""
    return side[-1]["content"] if isinstance(side, list) else str(side)


def encode(cfg: Any, tok: Any, rows: list[dict]) -> Pairs:
    """Both answers of each row, encoded as prompts.encode_chat trains them (prompt tokens unscored, the answer and
    its end-of-turn token scored, cut at train.max_length); a row with a side left without answer token is dropped
    (prepare already drops those from the splits)."""
    kept, seqs = [], []
    for i, r in enumerate(rows):
        enc = [prompts.encode_chat(tok, r["prompt"], _answer(r[side]), cfg.train.max_length)
               for side in ("chosen", "rejected")]
        if None not in enc:
            kept.append(i)
            seqs += enc
    return Pairs(kept, seqs, len(rows) - len(kept))


def log_probs(losses: list[float], seqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float]]:
    """(summed, per-token) log-probability of each sequence's scored tokens from its mean loss per scored token
    (forgetting.losses: the model's first token is never scored, so every label after it counts)."""
    out = []
    for loss, (_, labels) in zip(losses, seqs):
        n = sum(1 for x in labels[1:] if x != prompts.IGNORE)
        out.append((-loss * n, -loss))
    return out


def outcomes(lp: list[tuple[float, float]], per_token: bool = False) -> list[float]:
    """1 where a pair's chosen answer (even positions) has the higher log-probability than its rejected one, else 0."""
    k = 1 if per_token else 0
    return [1.0 if c[k] > r[k] else 0.0 for c, r in zip(lp[0::2], lp[1::2])]


def longer(rows: list[dict]) -> list[float]:
    """The `longer` baseline per pair: 1 where the chosen answer has more characters, 0.5 on a tie, else 0."""
    out = []
    for r in rows:
        c, j = len(text(r["chosen"])), len(text(r["rejected"]))
        out.append(1.0 if c > j else 0.5 if c == j else 0.0)
    return out


def margins(start: list[tuple[float, float]], tuned: list[tuple[float, float]], beta: float) -> list[float]:
    """DPO's implicit reward margin per pair with the starting model as reference:
    beta * ((tuned - start) summed log-prob of chosen - (tuned - start) of rejected)."""
    ratio = [t[0] - s[0] for s, t in zip(start, tuned)]
    return [beta * (c - r) for c, r in zip(ratio[0::2], ratio[1::2])]


def _share(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def evaluate(rows: list[dict], pairs: Pairs, start_losses: list[float], tuned_losses: list[float],
             beta: float | None, resamples: int) -> tuple[dict, list[dict]]:
    """(metrics.json's preference_accuracy, one row per scored pair for preference_pairs.csv)."""
    ls, lt = log_probs(start_losses, pairs.sequences), log_probs(tuned_losses, pairs.sequences)
    kept = [rows[i] for i in pairs.kept]
    o_s, o_t, o_l = outcomes(ls), outcomes(lt), longer(kept)
    pt_s, pt_t = outcomes(ls, True), outcomes(lt, True)
    marg = margins(ls, lt, beta) if beta is not None else []
    m = {"n": len(kept), "dropped": pairs.dropped, "start": _share(o_s), "tuned": _share(o_t), "longer": _share(o_l),
         "per_token": {"start": _share(pt_s), "tuned": _share(pt_t),
                       **metrics.paired(pt_t, pt_s, resamples)},
         "against": "start", "reference": REFERENCE, **metrics.paired(o_t, o_s, resamples),
         "vs_longer": metrics.paired(o_t, o_l, resamples), "beta": beta,
         "mean_reward_margin": sum(marg) / len(marg) if marg else None,
         "reward_accuracy": _share([1.0 if x > 0 else 0.0 for x in marg]) if marg else None}
    per = []
    for j, r in enumerate(kept):
        (sc, _), (sr, _), (tc, _), (tr, _) = ls[2 * j], ls[2 * j + 1], lt[2 * j], lt[2 * j + 1]
        per.append({"id": r.get("id", ""), "start_chosen_logp": round(sc, 4), "start_rejected_logp": round(sr, 4),
                    "tuned_chosen_logp": round(tc, 4), "tuned_rejected_logp": round(tr, 4),
                    "start_prefers_chosen": int(o_s[j]), "tuned_prefers_chosen": int(o_t[j]),
                    "longer_is_chosen": o_l[j], "reward_margin": round(marg[j], 4) if marg else ""})
    return m, per


def beta_of(cfg: Any, info: dict) -> float | None:
    """The beta the run trained with: adapter/run_info.json's preference block, else the recipe's train.beta; None
    for the reference-free orpo and simpo (their beta is not DPO's, so no implicit-reward margin)."""
    if ((info.get("preference") or {}).get("method") or getattr(cfg.train, "method", None)) in ("orpo", "simpo"):
        return None
    b = (info.get("preference") or {}).get("beta")
    return float(b) if b is not None else getattr(cfg.train, "beta", None)


def reward_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{rewards/* column: [(step, value)...]} from train_log.csv, only the columns present with values."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[tuple[int, float]]] = {}
    for col in REWARD_COLUMNS:
        pts = [(int(float(r.get("step") or 0)), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        if pts:
            out[col] = pts
    return out


def _halves(pts: list[tuple[int, float]]) -> tuple[float, float]:
    """Mean of the first and of the second half of the logged values (first and last of two)."""
    v = [y for _, y in pts]
    k = len(v) // 2
    return sum(v[:k]) / k, sum(v[len(v) - k:]) / k


def usual_shape(curves: dict[str, list[tuple[int, float]]]) -> str | None:
    """USUAL_SHAPE when the chosen rewards fell and the margins rose over training (the mean of the second half of
    the logged values against the first's), else None; None with fewer than two logged values."""
    c, g = curves.get("rewards/chosen", []), curves.get("rewards/margins", [])
    if len(c) < 2 or len(g) < 2:
        return None
    (c0, c1), (g0, g1) = _halves(c), _halves(g)
    return USUAL_SHAPE if c1 < c0 and g1 > g0 else None


def report_lines(p: dict, split: str, hint: str = "", shape: str | None = None) -> list[str]:
    """report.md's preference section: a plain sentence, the paired verdict (`hint`: compare.resolve_hint's
    sentence), per token, the baseline, the mean reward margin and the training log's shape."""
    who = "the starting model (the base model)"
    vl = p["vs_longer"]
    lines = ["## Preference accuracy", "",
             f"On {p['n']} held-out `{split}` pairs the tuned model gives the chosen answer a higher log-probability "
             f"than the rejected one in {p['tuned']:.1%} of pairs; the model it started from did in {p['start']:.1%}, "
             f"and always picking the longer answer would in {p['longer']:.1%}.", "",
             f"- tuned - start: {p['mean']:+.4f}, 95% CI [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] (paired bootstrap "
             f"over the same pairs) — the tuned model is **{metrics.VERDICT_WORDS[p['verdict']]} {who}** at "
             "preferring the chosen answer." + hint,
             f"- per token (log-probability divided by the answer's tokens): start {p['per_token']['start']:.1%}, "
             f"tuned {p['per_token']['tuned']:.1%}.",
             f"- tuned - `longer` baseline: {vl['mean']:+.4f}, 95% CI [{vl['ci_low']:+.4f}, {vl['ci_high']:+.4f}] — "
             f"{metrics.VERDICT_WORDS[vl['verdict']]} it."]
    if p.get("mean_reward_margin") is not None:
        lines.append(f"- mean reward margin (DPO's implicit reward, beta {p['beta']:g}, reference {who}): "
                     f"{p['mean_reward_margin']:+.4f}; positive on {p['reward_accuracy']:.1%} of pairs.")
    if p.get("dropped"):
        lines.append(f"- {p['dropped']} pairs left out: a side kept no answer token within train.max_length.")
    if shape:
        lines += ["", f"Training log: {shape}."]
    return lines + [""]
