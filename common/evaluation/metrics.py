"""Scores shared by the tasks: ROUGE/BLEU/chrF wrappers, degenerate-answer detection, macro-F1, paired verdicts.

Plain functions of predictions and references, no model: each is unit-tested by value (tests/test_tasks.py, tests/test_verdicts.py).
`evaluate.load()` needs the hub, so the packages are called directly (rouge-score, sacrebleu).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence


def bootstrap_ci(diffs: Sequence[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% percentile bootstrap interval (nan for no data)."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


CONFIDENCE = 0.95
Z = 1.96  # the normal quantile of a two-sided 95% interval
POWER, Z_POWER = 0.8, 0.8416  # examples_to_resolve plans for 80% power (the normal quantile of 0.8)
# A verdict word needs enough paired examples. The percentile bootstrap's interval is too narrow on few pairs: on
# normal differences it covered the true mean 74% of the time at 3 pairs, 89% at 8, 92% at 20 and 94% at 30
# (1,000 simulated samples each, docs/evaluation.md); from 30 pairs its 95% is about what it says. And at least 6
# pairs must differ: with 5 or fewer, even all going one way has an exact two-sided sign-test p of 2 x 0.5^5 =
# 0.06, so no 95% statement can rest on them (3 wins, 0 losses and 5 ties out of 8: p = 0.25).
MIN_PAIRS = 30
MIN_DIFFERING = 6
TOO_FEW = "too few examples to tell"

VERDICT_WORDS = {"better": "better than", "worse": "worse than", "not distinguishable": "not distinguishable from",
                 TOO_FEW: "not yet comparable with"}


def verdict(ci_low: float, ci_high: float) -> str:
    """What a paired 95% CI of (tuned - other) says: better, worse, or not distinguishable (the CI holds 0)."""
    if ci_low != ci_low or ci_high != ci_high:
        return "not distinguishable"
    return "better" if ci_low > 0 else "worse" if ci_high < 0 else "not distinguishable"


def too_few(diffs: Sequence[float]) -> bool:
    """Whether paired differences are too few for a verdict word: under MIN_PAIRS pairs or under MIN_DIFFERING
    pairs that differ."""
    return len(diffs) < MIN_PAIRS or sum(1 for x in diffs if x != 0) < MIN_DIFFERING


def examples_to_resolve(diffs: Sequence[float]) -> int | None:
    """Roughly how many paired examples resolve a mean difference of the observed size at 95% with 80% power:
    n = ((1.96 + 0.84) * sd / |mean|)^2 from the per-example spread, and never fewer than a verdict needs
    (MIN_PAIRS, and enough for MIN_DIFFERING differing pairs at the observed share); None when the mean is 0
    (no size to plan for) or there are under 2 examples."""
    import math

    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or d.mean() == 0:
        return None
    need = math.ceil(((Z + Z_POWER) * d.std(ddof=1) / abs(d.mean())) ** 2)
    differing = int((d != 0).sum())
    return max(need, MIN_PAIRS, math.ceil(MIN_DIFFERING * len(d) / differing))


def paired(ours: Sequence[float], other: Sequence[float], n: int, seed: int = 0, higher_is_better: bool = True
           ) -> dict:
    """ours - other on the same examples: mean, paired bootstrap 95% CI, what it says of `ours` (better / worse /
    not distinguishable, for a score where higher or lower is better; "too few examples to tell" below MIN_PAIRS
    pairs or MIN_DIFFERING differing ones) and roughly how many examples would resolve a difference of this size."""
    if len(ours) != len(other):
        raise ValueError(f"paired scores need the same examples: {len(ours)} vs {len(other)}")
    diffs = [a - b for a, b in zip(ours, other)]
    mean, lo, hi = bootstrap_ci(diffs, n, seed)
    word = verdict(lo, hi) if higher_is_better else verdict(-hi, -lo)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "verdict": TOO_FEW if too_few(diffs) else word,
            "examples_to_resolve": examples_to_resolve(diffs), "pairs_differing": sum(1 for x in diffs if x != 0),
            "confidence": CONFIDENCE, "bootstrap_resamples": n}


def degenerate(text: str) -> bool:
    """Repetitive output: a 4-gram repeated 3+ times, or under 40% distinct 3-grams in a long answer."""
    w = text.split()
    grams4 = Counter(tuple(w[i:i + 4]) for i in range(len(w) - 3))
    if grams4 and grams4.most_common(1)[0][1] >= 3:
        return True
    grams3 = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return len(grams3) >= 15 and len(set(grams3)) / len(grams3) < 0.4


def text_scores(preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
    """Aggregate and per-example ROUGE-1/2/L F1, length ratio, empty/degenerate flags; corpus sacreBLEU and chrF."""
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


def macro_f1(y: Sequence[str], p: Sequence[str], classes: Sequence[str]) -> float:
    """Mean F1 over the classes that occur in y or p (a prediction outside `classes` is simply wrong)."""
    f1s = []
    for c in classes:
        tp = sum(a == c and b == c for a, b in zip(y, p))
        fp = sum(a != c and b == c for a, b in zip(y, p))
        fn = sum(a == c and b != c for a, b in zip(y, p))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0
