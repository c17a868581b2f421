"""Preference pairs in the formats the field uses, detected and mapped to (prompt turns, chosen text, rejected text).

Formats (`FORMATS`): TRL's `standard` (prompt, chosen, rejected strings) and `conversational` (message lists);
`implicit` (chosen and rejected whole dialogues, Anthropic HH "\\n\\nHuman: ... \\n\\nAssistant: ..." strings or
message lists; the prompt is the turns they share); `ultrafeedback` (a prompt string with chosen/rejected message
lists that repeat it, score_chosen/score_rejected); `columns` (Argilla/Intel style: instruction or question,
chosen_response or chosen, rejected_response or rejected, an optional system column); `sharegpt_ranking`
(LLaMA-Factory's `"ranking": true`: conversations or messages, chosen and rejected single turns). `detect` reads the
keys and value types of the first records; data.columns renames the file's columns to ours (`COLUMNS`); roles are
mapped with the conversation formats' aliases (common/data/conversations.py). `to_pair` raises
conversations.Drop(reason) for a record that cannot be used.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from common.data import conversations

FORMATS = ("standard", "conversational", "implicit", "ultrafeedback", "columns", "sharegpt_ranking")
COLUMNS = ("prompt", "chosen", "rejected", "system", "instruction", "question", "chosen_response",
           "rejected_response", "score_chosen", "score_rejected", "conversations", "messages")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")  # Anthropic HH's turn markers


def rename(rec: dict, columns: dict) -> dict:
    """The record with its columns under our names (data.columns maps ours -> the file's)."""
    if not columns:
        return rec
    out = dict(rec)
    for ours, theirs in columns.items():
        if theirs in rec:
            out[ours] = rec[theirs]
    return out


def check_columns(columns: dict) -> None:
    """ValueError naming an entry of data.columns that is not one of COLUMNS."""
    for ours in columns or {}:
        if ours not in COLUMNS:
            raise ValueError(f"data.columns has unknown column '{ours}'; map any of {', '.join(COLUMNS)}")


def _side(rec: dict, name: str) -> Any:
    return rec[f"{name}_response"] if f"{name}_response" in rec else rec.get(name)


def classify(rec: dict) -> tuple[str, str] | None:
    """(format, the keys that showed it) of one record, or None when it holds no pair."""
    sides = [k for k in ("chosen", "rejected", "chosen_response", "rejected_response") if k in rec]
    if not sides:
        return None
    for col in ("conversations", "messages"):
        turns = rec.get(col)
        if isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns) and not isinstance(
                rec.get(sides[0]), list):
            return "sharegpt_ranking", f"{col}/{'/'.join(sides)}"
    asked = next((k for k in ("instruction", "question") if k in rec), None)
    if asked or any(k.endswith("_response") for k in sides):
        return "columns", f"{asked or 'prompt'}/{'/'.join(sides)}"
    if "prompt" not in rec:
        return "implicit", f"{'/'.join(sides)} (no prompt)"
    listed = any(isinstance(rec.get(k), list) for k in sides)
    if listed and ("score_chosen" in rec or "score_rejected" in rec or isinstance(rec["prompt"], str)):
        return "ultrafeedback", f"prompt/{'/'.join(sides)}" + ("/score_chosen" if "score_chosen" in rec else "")
    if listed or isinstance(rec["prompt"], list):
        return "conversational", f"prompt/{'/'.join(sides)} (message lists)"
    return "standard", f"prompt/{'/'.join(sides)}"


def detect(records: list[dict]) -> tuple[str | None, str]:
    """(the most common format of `records`, one log line saying what showed it); (None, the keys seen) when none."""
    votes: Counter = Counter()
    shown: dict[str, str] = {}
    for rec in records:
        if got := classify(rec):
            votes[got[0]] += 1
            shown.setdefault(*got)
    if not votes:
        keys = Counter(k for r in records for k in r)
        return None, ", ".join(k for k, _ in keys.most_common(8)) or "none"
    fmt, n = votes.most_common(1)[0]
    other = f"; {len(records) - n} of another or no format" if n < len(records) else ""
    return fmt, f"pair format: {fmt}, from keys {shown[fmt]} in the first {len(records)} records{other}"


def _turns(v: Any, m: conversations.Mapping) -> list[dict]:
    """A message list ({role, content} or {from, value} turns) as cleaned turns; a string as one user turn."""
    if isinstance(v, str) or v is None:
        return [{"role": "user", "content": conversations._text(v)}]
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise conversations.Drop("non_text_field")
    keys = ("from", "value") if any(isinstance(t, dict) and "from" in t for t in v) else ("role", "content")
    return conversations._from_list(v, *keys, m)


def _answer(v: Any, m: conversations.Mapping) -> str:
    """One side's answer text: a string, one turn, or a list of assistant turns (joined); '' when missing."""
    if v is None or isinstance(v, str):
        return conversations._text(v)
    turns = _turns(v, m)
    if any(t["role"] != "assistant" for t in turns):
        raise conversations.Drop("side_not_an_answer")
    return "\n\n".join(t["content"] for t in turns).strip()


def _hh(text: Any) -> list[dict]:
    """An HH-style dialogue string as turns (none for an empty string); no_shared_prompt when it has no marker."""
    if not isinstance(text, str):
        raise conversations.Drop("non_text_field")
    if not text.strip():
        return []
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3:
        raise conversations.Drop("no_shared_prompt")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _split_shared(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """(the shared turns, chosen's last answer, rejected's last answer) of two whole dialogues."""
    if not chosen or not rejected:
        raise conversations.Drop("empty_side")
    if chosen == rejected:
        raise conversations.Drop("identical_sides")
    prompt, c, r = chosen[:-1], chosen[-1], rejected[-1]
    if c["role"] != "assistant" or r["role"] != "assistant" or rejected[:-1] != prompt or not prompt:
        raise conversations.Drop("no_shared_prompt")
    return prompt, c["content"], r["content"]


def _raw(rec: dict, fmt: str, m: conversations.Mapping) -> tuple[list[dict], str, str]:
    """(prompt turns, chosen, rejected) of a record of format `fmt`, texts stripped, nothing checked yet."""
    chosen, rejected = _side(rec, "chosen"), _side(rec, "rejected")
    if fmt == "implicit":
        if chosen is None or rejected is None:
            raise conversations.Drop("empty_side")
        if isinstance(chosen, list) or isinstance(rejected, list):
            return _split_shared(_turns(chosen, m), _turns(rejected, m))
        return _split_shared(_hh(chosen), _hh(rejected))
    if fmt == "ultrafeedback":
        c, r = (_turns(s, m) if isinstance(s, list) else s for s in (chosen, rejected))
        if not isinstance(c, list) or not isinstance(r, list):  # a side without its prompt turns
            return _turns(rec.get("prompt"), m), _answer(c, m), _answer(r, m)
        prompt, c_text, r_text = _split_shared(c, r)
        score_c, score_r = rec.get("score_chosen"), rec.get("score_rejected")
        if isinstance(score_c, (int, float)) and isinstance(score_r, (int, float)):
            if score_c == score_r:
                raise conversations.Drop("tied_scores")
            if score_c < score_r:
                raise conversations.Drop("chosen_scored_lower")
        return prompt, c_text, r_text
    if fmt == "sharegpt_ranking":
        col = "conversations" if isinstance(rec.get("conversations"), list) else "messages"
        prompt = _turns(rec[col], m)
    elif fmt == "columns":
        prompt = _turns(next((rec[k] for k in ("instruction", "question", "prompt") if k in rec), None), m)
    else:
        prompt = _turns(rec.get("prompt"), m)
    system = conversations._text(rec.get("system"))
    if system is None:
        raise conversations.Drop("non_text_field")
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return prompt, _answer(chosen, m), _answer(rejected, m)


def to_pair(rec: dict, fmt: str, m: conversations.Mapping) -> tuple[list[dict], str, str]:
    """(prompt turns ending on a user turn, chosen answer, rejected answer) of one record in format `fmt`;
    conversations.Drop(reason) when it cannot be used: `empty_side` (a side missing or empty), `identical_sides`,
    `no_shared_prompt` (implicit dialogues), `empty_prompt`, `misplaced_system_turn`, `prompt_not_ending_on_user`,
    `other_format` / `no_pair` (a record of another format / of none), `tied_scores`, `chosen_scored_lower`
    (ultrafeedback scores), `unknown_role_*`, `non_text_*`, `malformed_turn`, `side_not_an_answer`."""
    got = classify(rec)
    if got is None:
        raise conversations.Drop("no_pair")
    if got[0] != fmt:
        raise conversations.Drop("other_format")
    prompt, chosen, rejected = _raw(rec, fmt, m)
    if chosen is None or rejected is None:
        raise conversations.Drop("non_text_field")
    if not chosen or not rejected:
        raise conversations.Drop("empty_side")
    if chosen == rejected:
        raise conversations.Drop("identical_sides")
    if not prompt or any(not t["content"] for t in prompt):
        raise conversations.Drop("empty_prompt")
    if any(t["role"] == "system" for t in prompt[1:]):
        raise conversations.Drop("misplaced_system_turn")
    if prompt[-1]["role"] != "user":
        raise conversations.Drop("prompt_not_ending_on_user")
    return prompt, chosen, rejected
