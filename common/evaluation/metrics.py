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


VERDICT_WORDS = {"better": "better than", "worse": "worse than", "not distinguishable": "not distinguishable from"}


def verdict(ci_low: float, ci_high: float) -> str:
    """What a paired 95% CI of (tuned - other) says: better, worse, or not distinguishable (the CI holds 0)."""
    if ci_low != ci_low or ci_high != ci_high:
        return "not distinguishable"
    return "better" if ci_low > 0 else "worse" if ci_high < 0 else "not distinguishable"


def examples_to_resolve(diffs: Sequence[float]) -> int | None:
    """Roughly how many examples make a mean paired difference of the observed size clear of 0 at 95%:
    n = (1.96 * sd / |mean|)^2 from the per-example spread; None when the mean is 0 or there are under 2 examples."""
    import math

    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or d.mean() == 0:
        return None
    return max(1, math.ceil((Z * d.std(ddof=1) / abs(d.mean())) ** 2))


def paired(ours: Sequence[float], other: Sequence[float], n: int, seed: int = 0, higher_is_better: bool = True
           ) -> dict:
    """ours - other on the same examples: mean, paired bootstrap 95% CI, what it says of `ours` (better / worse /
    not distinguishable, for a score where higher or lower is better) and roughly how many examples would resolve
    a difference of this size."""
    if len(ours) != len(other):
        raise ValueError(f"paired scores need the same examples: {len(ours)} vs {len(other)}")
    diffs = [a - b for a, b in zip(ours, other)]
    mean, lo, hi = bootstrap_ci(diffs, n, seed)
    return {"mean": mean, "ci_low": lo, "ci_high": hi,
            "verdict": verdict(lo, hi) if higher_is_better else verdict(-hi, -lo),
            "examples_to_resolve": examples_to_resolve(diffs), "confidence": CONFIDENCE, "bootstrap_resamples": n}


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
