"""Conversations -> the assistant's answers: the user's own chat data in OpenAI, ShareGPT, Alpaca or prompt/completion form.

Records: JSON lines, a JSON array, Parquet, CSV (the flat formats), gzip of each, or a dataset folder / hub id
(`data.path: hub:owner/name`) through datasets.load_dataset; the conversation format is detected from the first
`data.detect_records` records (common/data/conversations.py) unless `data.format` names one, with column and role
names mapped by `data.columns` / `data.roles`. Each kept record is one conversation ({role, content} turns, a system
turn first when the data has one; otherwise the recipe's prompt.system is used). Cleaning counts every dropped row by
reason with its line number and every repair (merged consecutive turns, removed trailing turns); duplicates are
dropped. A conversation the template cannot render, or with no trained token left after train.max_length, is dropped
in prepare (scripts/01_prepare.py), never trained all-masked.
Evaluation: each test conversation is cut before its last assistant turn, which the models answer. Scores: ROUGE-L
(the paired CI), ROUGE-1/2, sacreBLEU, chrF, length ratio (stop rate from the comparison); and the held-out answer loss
per token, base vs tuned, paired (`held_out_loss`). Baseline: `retrieval` (the answer of the train conversation whose
last user turn is the most similar, TF-IDF cosine).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from common.core.io import UserError
from common.core.schema import F
from common.data import conversations, prompts, readers
from common.tasks import Task

log = logging.getLogger("ft")


class Chat(Task):
    name = "chat"
    expects = "conversations: messages, ShareGPT, Alpaca or prompt/completion records (README: Your own data)"
    fields = ("messages", "uid")
    prompt_defaults = {"user": "", "target": ""}  # a conversation brings its own turns
    settings = {
        "data": {
            "format": F(str, "auto", ("auto", *conversations.FORMATS)),  # auto: detected from the records
            "file_format": F(str, "auto", ("auto", "jsonl", "json", "csv", "parquet")),  # auto: suffix and content
            "columns": F(dict, {}),  # ours -> the file's, e.g. {messages: dialog, role: speaker, content: text}
            "roles": F(dict, {}),  # extra role aliases -> system/user/assistant/tool, e.g. {customer: user}
            "detect_records": F(int, 100),  # records the format is detected from
            "split": F(str, "train"),  # the split of a dataset folder or hub id
            "dedupe": F(bool, True),  # drop a conversation that repeats an earlier one turn for turn
        },
        # every assistant turn of a conversation trained, wherever task: chat is used (completion: the last only)
        "train": {"loss_on": F(str, "assistant_turns", ("completion", "assistant_turns"))},
    }
    primary = "rougeL"
    per_example = "rougeL"
    duplicate_reason = "duplicate"
    demo_field = "message"
    held_out_loss = True  # eval scores each model's loss per token on the test answers

    def source(self, setting: str) -> Path | str | None:
        """`hub:owner/name` (returned as that string) or a dataset folder; None for a file."""
        if setting.startswith("hub:"):
            return setting
        folder = Path(setting).expanduser()
        return folder if folder.is_dir() else None

    def _rows(self, source: Path | str, cfg: Any, rep: readers.Report) -> Iterator[tuple[Any, dict]]:
        if isinstance(source, str):
            return readers.iter_dataset(source.removeprefix("hub:"), cfg.data.split, rep)
        if source.is_dir():
            return readers.iter_dataset(str(source), cfg.data.split, rep)
        return readers.iter_records(source, cfg.data.file_format, rep)

    def records(self, path: Path | str, cfg: Any, rep: readers.Report) -> Iterator[tuple[str | None, dict]]:
        d = cfg.data
        try:
            mapping = conversations.Mapping.from_settings(d.columns, d.roles)
        except ValueError as e:
            raise UserError(str(e)) from None
        rows = self._rows(path, cfg, rep)
        head = list(itertools.islice(rows, max(1, d.detect_records)))
        if not head:
            raise UserError(f"{path}: no readable record in its first {rep.read} rows "
                            f"({', '.join(f'{k} {v}' for k, v in rep.dropped.most_common(3)) or 'no rows'}); expected "
                            "JSON lines, a JSON array, Parquet or CSV of conversations (README: Your own data)")
        fmt, line = conversations.detect([r for _, r in head], mapping)
        if d.format != "auto":
            fmt, line = d.format, f"format: {d.format} (data.format); detected: {line}"
        elif fmt is None:
            raise UserError(f"{path}: no conversation format in the first {len(head)} records (keys seen: {line}); "
                            f"expected {', '.join(conversations.FORMATS)} records, or map your column names with "
                            "data.columns (README: Your own data)")
        log.info("%s", line)
        kept = 0
        for where, rec in itertools.chain(head, rows):
            try:
                turns, fixes = conversations.to_turns(rec, fmt, mapping)
            except conversations.Drop as e:
                rep.drop(e.reason, where)
                continue
            for what in fixes:
                rep.repair(what, where)
            kept += 1
            key = hashlib.sha1(json.dumps(turns).encode()).hexdigest() if d.dedupe else None
            yield key, {"uid": str(where), "messages": turns}
        if not kept:
            raise UserError(nothing_usable(path, fmt, rep))

    def score(self, preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
        from common.evaluation import metrics

        return metrics.text_scores(preds, refs)

    def baselines(self, train: list[dict], rows: list[dict]) -> dict[str, list[str]]:
        from common.evaluation import retrieval

        if not train:
            return {}
        best = retrieval.nearest([prompts.prompt_text(r) for r in train], [prompts.prompt_text(r) for r in rows])
        return {"retrieval": [prompts.reference(train[i]) for i in best]}

    def demo_fields(self, text: str, extra: dict[str, str]) -> dict:
        """The typed message as the user turn the models answer (the empty answer turn is where the cut falls)."""
        return {"uid": "demo", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}


def nothing_usable(source: Any, fmt: str | None, rep: readers.Report) -> str:
    """One line for a file with no usable conversation: the format, the two commonest reasons, their first lines."""
    reasons = "; ".join(f"{k} {v} (first at {', '.join(map(str, rep.where[k][:3]))})"
                        for k, v in rep.dropped.most_common(2)) or "no rows"
    return (f"{source}: no usable conversation out of {rep.read} read as format {fmt} ({reasons}); fix those rows, "
            "or set data.format / data.columns / data.roles (README: Your own data)")


TASK = Chat()
