"""The retrieval baseline's similarity (common/evaluation/retrieval.py) by value: TF-IDF cosine equal to a dense
reference computed the textbook way, the lowest index on ties and when no word is shared, the same answers whatever
the block size, no dense train x vocabulary matrix, and the bench script at a small size."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from conftest import REPO

from common.evaluation import retrieval


def dense_reference(train: list[str], queries: list[str]) -> np.ndarray:
    """Query x train cosine of smoothed-idf TF-IDF vectors, dense, from the definition."""
    vocab = sorted({w for t in train for w in retrieval.words(t)})
    df = Counter(w for t in train for w in set(retrieval.words(t)))
    idf = {w: math.log((1 + len(train)) / (1 + df[w])) + 1 for w in vocab}

    def vec(text: str) -> np.ndarray:
        c = Counter(retrieval.words(text))
        v = np.array([c[w] * idf[w] for w in vocab])
        return v / max(np.linalg.norm(v), 1e-12)

    return np.array([[vec(q) @ vec(t) for t in train] for q in queries])


def test_rarer_word_decides_and_unknown_words_are_ignored():
    # "acme" is in two train titles, "knife" in one: the rarer word decides; "zzz" is in no train title
    assert retrieval.nearest(["Acme Fountain Pen", "Knife Block, Acme"], ["acme knife zzz"]) == [1]


def test_ties_and_no_shared_word_give_the_lowest_index():
    train = ["red pan", "blue cup", "red pan", "Blue  CUP!"]
    assert retrieval.nearest(train, ["red pan", "cup blue", "nothing here", "", "pan"]) == [0, 1, 0, 0, 0]


def test_equals_the_dense_definition_on_random_titles():
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    make = lambda n: [" ".join(rng.choice(words, size=rng.integers(1, 7))) for _ in range(n)]  # noqa: E731
    train, queries = make(150), make(60)
    sims = dense_reference(train, queries)
    got = retrieval.nearest(train, queries)
    for q, i in enumerate(got):
        # the chosen train text has the highest similarity (up to float rounding), the lowest index among equals
        assert sims[q, i] == pytest.approx(sims[q].max(), abs=1e-12)
        assert i == int(np.flatnonzero(np.isclose(sims[q], sims[q].max(), rtol=0, atol=1e-12))[0])


def test_blocks_do_not_change_the_answers(monkeypatch):
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(30)]
    train = [" ".join(rng.choice(words, size=5)) for _ in range(300)]
    queries = [" ".join(rng.choice(words, size=3)) for _ in range(80)] + ["", "unknown"]
    whole = retrieval.nearest(train, queries)
    monkeypatch.setattr(retrieval, "BLOCK_POSTINGS", 1)  # one query per block
    assert retrieval.nearest(train, queries) == whole


def test_no_train_texts_is_an_error():
    with pytest.raises(ValueError, match="no train texts"):
        retrieval.nearest([], ["a"])


def test_memory_grows_with_the_words_not_train_times_vocabulary():
    """10,000 train titles over 10,000 distinct words: a dense train x vocabulary matrix would take 800 MB; the
    peak of what nearest() allocates (numpy and scipy arrays, as tracemalloc sees them) stays under 20 MB
    (3 MB on 2026-12-05; the dense version peaked at 1.6 GB)."""
    train = [f"w{i} w{(i * 7) % 10_000} common" for i in range(10_000)]
    retrieval.nearest(train[:2], ["w0"])  # scipy's import is not nearest()'s memory
    tracemalloc.start()
    try:
        got = retrieval.nearest(train, ["w3 w21", "w0"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [3, 0]
    assert peak < 20e6, f"nearest() peaked at {peak / 1e6:.0f} MB"


def test_bench_script_prints_its_figures():
    out = subprocess.run([sys.executable, "scripts/bench_retrieval.py", "--train", "3000", "--queries", "20",
                          "--vocab", "2000"], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["train_titles"] == 3000 and got["queries"] == 20
    assert got["nearest_s"] >= 0 and got["peak_rss_mb"] >= got["peak_rss_mb_after_data"] > 0
    assert got["answers_sharing_a_word"] == 20
