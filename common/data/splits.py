"""What prepare adds to the task's splits: val records the sample left out and replayed general text.

Both leave the test split as it is. Extra val records come from the records the seeded sample did not take, so
train, val's first data.val_size records and test are the same examples with or without them (a sweep chooses its
best run on a larger val without touching the test set). Replay mixes general English (data/general/replay.txt,
never a passage of the forgetting check's data/general/passages.txt) into the train split, data.replay being its
share of the train split. Each replayed passage is an assistant answer to one fixed request, trained like the
task's answers (loss on the passage only): the forgetting check scores raw passages split at their middle word,
so replay trains neither its passages nor its exact form, and a lower forgetting figure means the model kept its
general English, not that it practised the check.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.core import paths
from common.core.io import UserError
from common.data import readers

REPLAY_TEXT = paths.REPLAY_TEXT
REPLAY_ASK = "Write a short passage of plain English."  # the user turn every replayed passage answers


def extra_val(cfg: Any, task: Any, path: Path, parts: dict[str, list[dict]]) -> tuple[list[dict], str | None]:
    """data.val_extra records (seeded) from those no split holds, duplicates of held ones left out; (records, a note
    when fewer were left than asked)."""
    want = cfg.data.val_extra
    if want <= 0:
        return [], None
    used = {r["uid"] for rows in parts.values() for r in rows}

    def fresh() -> Iterator[tuple[None, dict]]:
        seen: set[int] = set()
        for key, fields in task.records(path, cfg, readers.Report()):
            if key is not None:
                if hash(key) in seen:  # a repeat of a record read earlier, held by a split or not
                    continue
                seen.add(hash(key))
            if fields["uid"] not in used:
                yield None, fields

    got = readers.collect(fresh(), want, cfg.data.seed + 1, readers.Report(), task.duplicate_reason)
    random.Random(cfg.data.seed + 1).shuffle(got)
    note = None if len(got) == want else (f"data.val_extra={want}: only {len(got)} records were left outside the "
                                          f"sample; val has {len(parts['val']) + len(got)}")
    return got, note


def replay_passages(path: Path = REPLAY_TEXT) -> list[str]:
    """The non-empty lines of the replay text."""
    if not path.is_file():
        raise UserError(f"replay text {path} is missing; it ships with the repository (data.replay needs it)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replay_example(cfg: Any, architecture: Any, i: int, text: str) -> dict:
    """One replayed passage as a training example of the recipe's architecture: the answer to REPLAY_ASK."""
    if architecture.name == "causal":
        ex = architecture.build(cfg, {"messages": [{"role": "user", "content": REPLAY_ASK},
                                                   {"role": "assistant", "content": text}]})
    else:
        ex = {"prompt": REPLAY_ASK, "completion": text}
    return {"id": f"replay{i}", **ex, "replay": True}


def replay_count(share: float, n_task: int) -> int:
    """Replay examples that make `share` of a train split holding n_task task examples."""
    return round(share * n_task / (1 - share)) if share > 0 else 0


def add_replay(cfg: Any, architecture: Any, tok: Any, train: list[dict]) -> tuple[list[dict], dict]:
    """(train with replayed passages shuffled in, what was added). Passages are drawn in a seeded order, each used
    once before any repeats; with a tokenizer, a passage keeping no trained token within train.max_length is
    skipped. Without replay the split is returned as it is."""
    n = replay_count(cfg.data.replay, len(train))
    if n == 0:
        return train, {}
    texts, rng = replay_passages(), random.Random(cfg.data.seed)
    rows: list[dict] = []
    used: set[str] = set()
    while len(rows) < n:
        batch = texts[:]
        rng.shuffle(batch)  # each passage once per round
        before = len(rows)
        for text in batch[: n - len(rows)]:
            ex = replay_example(cfg, architecture, len(rows), text)
            if tok is None or not architecture.trained_tokens(cfg, tok, ex, last_only=False)[0]:
                rows.append(ex)
                used.add(text)
        if len(rows) == before:
            raise UserError(f"data.replay={cfg.data.replay}: no passage of {REPLAY_TEXT} fits train.max_length="
                            f"{cfg.train.max_length}; raise it or set data.replay=0")
    out = train + rows
    rng.shuffle(out)
    return out, {"share": cfg.data.replay, "examples": len(rows), "passages": len(used),
                 "file": str(REPLAY_TEXT.relative_to(paths.REPO)), "as": f"assistant answer to {REPLAY_ASK!r}"}
