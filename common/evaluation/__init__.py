"""Evaluation: base vs tuned on the same test examples, from the same weights: cached generations, the task's
scores, paired confidence intervals and verdicts against the strongest simple baseline, and the forgetting check on
general text. It hands eval/metrics.json and report.md to shipping (cards, the report page)."""
