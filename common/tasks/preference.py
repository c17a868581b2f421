"""Preference pairs -> a model that prefers the chosen answer: DPO, IPO, ORPO or SimPO on the field's pair formats.

Records: JSON lines, a JSON array, Parquet, CSV, gzip of each, or a dataset folder / hub id (`data.path:
hub:owner/name`), as the chat task reads them; the pair format (common/data/pairs.py: TRL standard or
conversational, implicit HH dialogues, UltraFeedback, Argilla/Intel columns, LLaMA-Factory ShareGPT ranking) is
detected from the first `data.detect_records` records unless `data.format` names one. Cleaning counts every dropped
pair by reason with its line (identical sides, an empty or missing side, an exact duplicate pair, implicit dialogues
that share no prompt, rows that are not JSON; in prepare, a side that keeps no answer token within
train.max_length). A file with nothing usable stops in one line.
Splits: held-out pairs are split by prompt, never by pair (every pair of one prompt lands in one split). Processed
rows are TRL's conversational preference format plus `completion` (= chosen) for generation and ROUGE-L.
Training: scripts/02_preference.py (`trains = "preference"`). Scores: ROUGE-L against the chosen answer; eval also
scores each pair's two answers (`pairs`). Baseline: `retrieval`, as the chat task has (the answer is the chosen one).
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
from common.data import conversations, pairs, readers
from common.tasks.chat import Chat

log = logging.getLogger("ft")
SPLITS = ("train", "val", "test")


class Preference(Chat):
    name = "preference"
    expects = "preference pairs: prompt/chosen/rejected in a format of common/data/pairs.py (docs/guide.md)"
    fields = ("prompt", "chosen", "rejected", "uid")
    prompt_defaults = {"user": "", "target": ""}  # a pair brings its own prompt
    settings = {
        "data": {
            "format": F(str, "auto", ("auto", *pairs.FORMATS)),  # auto: detected from the records
            "file_format": F(str, "auto", ("auto", "jsonl", "json", "csv", "parquet")),  # auto: suffix and content
            "columns": F(dict, {}),  # ours -> the file's, e.g. {prompt: query, chosen: good, rejected: bad}
            "detect_records": F(int, 100),  # records the format is detected from
            "split": F(str, "train"),  # the split of a dataset folder or hub id
            "dedupe": F(bool, True),  # drop a pair that repeats an earlier one exactly
        },
        "train": {
            "method": F(str, "dpo", ("dpo", "ipo", "orpo", "simpo")),
            "beta": F(float, 0.1),
            "simpo_gamma": F(float, 0.5),  # SimPO's target reward margin
            "precompute_ref": F(bool, False),  # dpo/ipo: reference log-probs computed once before training
            "sft_weight": F(float, 0.0),  # dpo/ipo/simpo: + this x the chosen answer's NLL (keeps it likely; orpo has its own)
        },
    }
    duplicate_reason = "duplicate_pair"
    held_out_loss = False
    trains = "preference"
    pairs = True

    def records(self, path: Path | str, cfg: Any, rep: readers.Report) -> Iterator[tuple[str | None, dict]]:
        d = cfg.data
        try:
            pairs.check_columns(d.columns)
        except ValueError as e:
            raise UserError(str(e)) from None
        m = conversations.Mapping()
        rows = ((where, pairs.rename(rec, d.columns)) for where, rec in self._rows(path, cfg, rep))
        head = list(itertools.islice(rows, max(1, d.detect_records)))
        if not head:
            raise UserError(f"{path}: no readable record in its first {rep.read} rows "
                            f"({', '.join(f'{k} {v}' for k, v in rep.dropped.most_common(3)) or 'no rows'}); expected "
                            "JSON lines, a JSON array, Parquet or CSV of preference pairs (docs/guide.md)")
        fmt, line = pairs.detect([r for _, r in head])
        if d.format != "auto":
            fmt, line = d.format, f"pair format: {d.format} (data.format); detected: {line}"
        elif fmt is None:
            raise UserError(f"{path}: no preference pair format in the first {len(head)} records (keys seen: {line}); "
                            f"expected {', '.join(pairs.FORMATS)} records, or map your column names with data.columns "
                            "(docs/guide.md: Preference data)")
        log.info("%s", line)
        kept = 0
        for where, rec in itertools.chain(head, rows):
            try:
                prompt, chosen, rejected = pairs.to_pair(rec, fmt, m)
            except conversations.Drop as e:
                rep.drop(e.reason, where)
                continue
            kept += 1
            key = hashlib.sha1(json.dumps([prompt, chosen, rejected]).encode()).hexdigest() if d.dedupe else None
            yield key, {"uid": str(where), "prompt": prompt, "chosen": chosen, "rejected": rejected}
        if not kept:
            reasons = "; ".join(f"{k} {v} (first at {', '.join(map(str, rep.where[k][:3]))})"
                                for k, v in rep.dropped.most_common(2)) or "no rows"
            raise UserError(f"{path}: no usable preference pair out of {rep.read} read as format {fmt} ({reasons}); "
                            "fix those rows, or set data.format / data.columns (docs/guide.md: Preference data)")

    # ------------------------------------------------------------------ prepare's hooks
    def split(self, cfg: Any, path: Path | str, rep: readers.Report) -> tuple[dict[str, list[dict]], str | None]:
        """The seeded sample split by prompt: the split sizes count pairs, and all pairs of a prompt stay together."""
        refuse(cfg)
        parts, note = readers.split_records(cfg, self, path, rep)
        want = [len(parts[k]) for k in SPLITS]
        return by_prompt([r for k in SPLITS for r in parts[k]], want), note

    def extra_val(self, cfg: Any, path: Path | str, parts: dict[str, list[dict]]) -> tuple[list[dict], str | None]:
        """data.val_extra pairs the sample left out whose prompt no split holds."""
        if cfg.data.val_extra <= 0:
            return [], None
        held = {prompt_key(r) for rows in parts.values() for r in rows}
        used = {r["uid"] for rows in parts.values() for r in rows}

        def fresh() -> Iterator[tuple[str | None, dict]]:
            for key, fields in self.records(path, cfg, readers.Report()):
                if fields["uid"] not in used and prompt_key(fields) not in held:
                    yield key, fields

        got = readers.collect(fresh(), cfg.data.val_extra, cfg.data.seed + 1, readers.Report(), self.duplicate_reason)
        note = None if len(got) == cfg.data.val_extra else (
            f"data.val_extra={cfg.data.val_extra}: only {len(got)} pairs with prompts outside the splits were left; "
            f"val has {len(parts['val']) + len(got)}")
        return got, note

    def examples(self, cfg: Any, architecture: Any, records: list[dict], seed: int, extend: bool) -> list[dict]:
        """TRL's conversational preference rows, plus `completion` (the chosen answer) for generation and ROUGE-L."""
        system = cfg.prompt.system
        out = []
        for r in records:
            prompt = r["prompt"]
            if system and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": system}, *prompt]
            chosen = [{"role": "assistant", "content": r["chosen"]}]
            out.append({"id": r["uid"], "prompt": prompt, "chosen": chosen,
                        "rejected": [{"role": "assistant", "content": r["rejected"]}], "completion": chosen})
        return out

    def trained_tokens(self, cfg: Any, architecture: Any, tok: Any, ex: dict, last_only: bool
                       ) -> tuple[str | None, int, int]:
        """Both sides must keep an answer token within train.max_length; their trained and total tokens summed."""
        trained = total = 0
        for side in ("chosen", "rejected"):
            why, n, n_all = architecture.trained_tokens(cfg, tok, {"prompt": ex["prompt"], "completion": ex[side]},
                                                        last_only=True)
            if why:
                return why, 0, 0
            trained, total = trained + n, total + n_all
        return None, trained, total

    def lengths(self, architecture: Any, tok: Any, ex: dict) -> list[int]:
        """Prompt + chosen, prompt + rejected: the two sequences a pair puts through the model."""
        return [architecture.length(tok, {"prompt": ex["prompt"], "completion": ex[s]}) for s in ("chosen", "rejected")]


def refuse(cfg: Any) -> None:
    """One line for a setting that has no meaning for pairs."""
    if cfg.model.arch != "causal":
        raise UserError("task preference needs a decoder-only model (model.arch: causal)")
    if cfg.data.replay > 0:
        raise UserError(f"data.replay={cfg.data.replay}: replayed text is for supervised training; task preference "
                        "has no replay (set data.replay: 0)")
    if cfg.prompt.conversation_extension > 1:
        raise UserError("prompt.conversation_extension chains supervised examples; task preference keeps it at 1")


def prompt_key(fields: dict) -> str:
    return json.dumps(fields["prompt"], sort_keys=True)


def by_prompt(records: list[dict], want: list[int]) -> dict[str, list[dict]]:
    """Records (in their shuffled order) grouped by prompt, whole groups given to test, then val, then train until
    each reaches its count of `want` (train/val/test); train keeps at least one group."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(prompt_key(r), []).append(r)
    order = list(groups.values())
    parts: dict[str, list[dict]] = {k: [] for k in SPLITS}
    left = len(order)
    for name, n in (("test", want[2]), ("val", want[1]), ("train", want[0])):
        while order and len(parts[name]) < n and (name == "train" or left > 1):
            parts[name] += order.pop(0)
            left -= 1
    n_prompts = {k: len({prompt_key(r) for r in v}) for k, v in parts.items()}
    log.info("split by prompt: %s pairs of %s prompts (train/val/test)", [len(parts[k]) for k in SPLITS],
             [n_prompts[k] for k in SPLITS])
    return parts


TASK = Preference()
