"""The retrieval baseline at the real data's scale: synthetic titles, the time and peak memory of nearest().

Titles are drawn from a Zipf-like vocabulary (word rank r has weight 1 / (r + 3)), 4 to 14 words each, so a few
words sit in a large share of the titles, as "black", "set" and "pack" do in AmazonTitles; the queries are drawn
the same way. Peak memory is the process's peak RSS (the synthetic titles included, as eval holds its train split).
"""
from __future__ import annotations

import resource
import time

import numpy as np

from common.evaluation import retrieval


def synthetic_titles(n: int, vocab: int, rng: np.random.Generator) -> list[str]:
    weights = 1.0 / (np.arange(vocab) + 3.0)
    lengths = rng.integers(4, 15, size=n)
    ids = rng.choice(vocab, size=int(lengths.sum()), p=weights / weights.sum())
    names = [f"w{i}" for i in range(vocab)]
    ends = np.cumsum(lengths)
    return [" ".join(names[j] for j in ids[e - k:e]) for e, k in zip(ends.tolist(), lengths.tolist())]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(train: int, queries: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    docs = synthetic_titles(train, vocab, rng)
    qs = synthetic_titles(queries, vocab, rng)
    made_s, rss_data = time.perf_counter() - start, peak_rss_mb()
    start = time.perf_counter()
    best = retrieval.nearest(docs, qs)
    nearest_s = time.perf_counter() - start
    shared = sum(bool(set(retrieval.words(q)) & set(retrieval.words(docs[b]))) for q, b in zip(qs, best))
    return {"train_titles": train, "queries": queries, "vocabulary": vocab, "seed": seed,
            "generate_s": round(made_s, 1), "nearest_s": round(nearest_s, 1),
            "peak_rss_mb_after_data": round(rss_data), "peak_rss_mb": round(peak_rss_mb()),
            "answers_sharing_a_word": shared}
