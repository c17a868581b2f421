"""Benchmark of the retrieval baseline (common/evaluation/retrieval.py) at the real data's scale.

    python scripts/bench_retrieval.py                        # 1,000,000 train titles, 1,000 queries
    python scripts/bench_retrieval.py --train 20000 --queries 100

Synthetic titles (common/measurement/retrieval_bench.py); prints one JSON line: the time of nearest(), the peak
RSS of the process (titles included) and how many answers share a word with their query. Writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

from common.measurement import retrieval_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1_000_000, help="train titles")
    p.add_argument("--queries", type=int, default=1_000, help="eval titles")
    p.add_argument("--vocab", type=int, default=60_000, help="distinct title words")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(retrieval_bench.run(a.train, a.queries, a.vocab, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
