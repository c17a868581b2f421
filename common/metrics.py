"""Scores shared by the tasks: ROUGE/BLEU/chrF wrappers, degenerate-answer detection, macro-F1, bootstrap CI.

Plain functions of predictions and references, no model: each is unit-tested by value (tests/test_metrics.py).
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
