"""Nearest train text per query by TF-IDF cosine over words, sparse, in memory that grows with the words, not
with train texts x vocabulary.

`nearest(train_texts, queries)` returns, for each query, the index of the most similar train text: raw word
counts (words: `\\w+`, lower-cased) times smoothed idf `ln((1 + n) / (1 + df)) + 1` (n train texts; scikit-learn's
TfidfVectorizer default), each row l2-normalised, cosine = dot product. Words no train text has are ignored. Ties,
and a query that shares no word with any train text, give the lowest index. Both sides are scipy CSR matrices and
the queries are scored in blocks (query block x inverted index), so 1,000,000 train titles fit in a few hundred MB
(scripts/bench_retrieval.py measures it; docs/performance.md has the figures).
"""
from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"\w+")
# Postings one block of queries may touch before the block is scored (bounds the block's sparse result).
BLOCK_POSTINGS = 4_000_000


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _counts(texts: list[str], vocab: dict[str, int], grow: bool):
    """Word-count CSR matrix (len(texts) x len(vocab)); with grow, unseen words are added to vocab."""
    from scipy import sparse

    indptr = [0]
    cols: list[int] = []
    for t in texts:
        if grow:
            cols.extend(vocab.setdefault(w, len(vocab)) for w in words(t))
        else:
            cols.extend(i for i in (vocab.get(w) for w in words(t)) if i is not None)
        indptr.append(len(cols))
    ind = np.asarray(cols, dtype=np.int32)
    m = sparse.csr_matrix((np.ones(len(ind)), ind, np.asarray(indptr, dtype=np.int64)),
                          shape=(len(texts), len(vocab)))
    m.sum_duplicates()  # repeated words add up to their count; indices sorted
    return m


def _tfidf(counts, idf: np.ndarray):
    from scipy import sparse

    m = counts @ sparse.diags(idf, format="csr")
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    return sparse.diags(1.0 / np.maximum(norms, 1e-12), format="csr") @ m


def nearest(train_texts: list[str], queries: list[str]) -> list[int]:
    """For each query, the index of the most similar train text (TF-IDF cosine; ties and no shared word: the
    lowest index). An empty train_texts is an error: there is nothing to retrieve."""
    if not train_texts:
        raise ValueError("nearest: no train texts to retrieve from")
    vocab: dict[str, int] = {}
    docs = _counts(train_texts, vocab, grow=True)
    df = np.bincount(docs.indices, minlength=len(vocab))
    idf = np.log((1 + len(train_texts)) / (1 + df)) + 1
    docs_t = _tfidf(docs, idf).T.tocsr()  # inverted index: word -> (train text, weight)
    del docs
    q = _tfidf(_counts(queries, vocab, grow=False), idf)
    postings = np.diff(docs_t.indptr)
    cum = np.concatenate([[0], np.cumsum(postings[q.indices])])
    touched = cum[q.indptr[1:]] - cum[q.indptr[:-1]]  # postings each query's words touch
    out: list[int] = []
    start = 0
    while start < len(queries):
        stop, load = start + 1, touched[start]
        while stop < len(queries) and load + touched[stop] <= BLOCK_POSTINGS:
            load += touched[stop]
            stop += 1
        scores = (q[start:stop] @ docs_t).tocsr()
        scores.sort_indices()
        for r in range(stop - start):
            lo, hi = scores.indptr[r], scores.indptr[r + 1]
            data = scores.data[lo:hi]
            if hi == lo or data.max() <= 0:
                out.append(0)
            else:
                out.append(int(scores.indices[lo:hi][np.flatnonzero(data == data.max())[0]]))
        start = stop
    return out
