"""Conversation records in the formats the field uses, detected, mapped to role/content turns and cleaned.

Formats (`FORMATS`): OpenAI `messages: [{role, content}]`, ShareGPT `conversations: [{from, value}]`, Alpaca
`instruction, input, output` (+ `system`, `history: [[user, assistant], ...]`) and TRL's `prompt, completion`
(strings or message lists). `detect` reads the keys and value types of the first records; `Mapping` holds the column
and role names (built-in aliases plus the recipe's `data.columns` and `data.roles`). `to_turns` turns one record into
a cleaned list of {role, content} turns, or the reason it is dropped; what it repairs (consecutive turns of one role
merged, a trailing user turn removed) is counted too. Nothing here knows a tokenizer except `unrenderable`, which asks
one whether its chat template shows a conversation's tool turns.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
# Role names seen in the wild (OpenAI, ShareGPT, LLaMA-Factory, Gemini, ...) -> ours; the recipe's data.roles adds more.
ALIASES = {
    "system": "system", "user": "user", "human": "user", "humans": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "ai": "assistant", "answer": "assistant", "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
MISSING = {"messages": "missing_messages", "sharegpt": "missing_conversations", "alpaca": "missing_instruction_output",
           "prompt_completion": "missing_prompt_completion"}  # drop reason of a record that is of no format
# Our column names and where each format keeps them by default; data.columns maps ours -> the file's.
DEFAULT_COLUMNS = {"messages": "messages", "conversations": "conversations", "role": "role", "content": "content",
                   "from": "from", "value": "value", "instruction": "instruction", "input": "input",
                   "output": "output", "system": "system", "history": "history", "prompt": "prompt",
                   "completion": "completion"}


@dataclass
class Mapping:
    """Column names (ours -> the file's) and role aliases (lower-cased name -> one of ROLES)."""

    columns: dict = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    roles: dict = field(default_factory=lambda: dict(ALIASES))

    @classmethod
    def from_settings(cls, columns: dict | None, roles: dict | None) -> "Mapping":
        """The built-in names with the recipe's data.columns / data.roles on top; a bad entry raises ValueError."""
        m = cls()
        for ours, theirs in (columns or {}).items():
            if ours not in DEFAULT_COLUMNS:
                raise ValueError(f"data.columns has unknown column '{ours}'; map any of {', '.join(DEFAULT_COLUMNS)}")
            m.columns[ours] = str(theirs)
        for alias, role in (roles or {}).items():
            if role not in ROLES:
                raise ValueError(f"data.roles maps '{alias}' to '{role}'; map to one of {', '.join(ROLES)}")
            m.roles[str(alias).lower()] = role
        return m

    def col(self, ours: str) -> str:
        return self.columns[ours]


def _turn_list(rec: dict, m: Mapping) -> tuple[str, list] | None:
    """(column, list of turn dicts) of the first turn-list column the record has."""
    for ours in ("messages", "conversations"):
        v = rec.get(m.col(ours))
        if isinstance(v, list) and v and all(isinstance(t, dict) for t in v):
            return m.col(ours), v
    return None


def classify(rec: dict, m: Mapping) -> tuple[str, str] | None:
    """(format, the keys that showed it) of one record, or None when it is none of FORMATS."""
    found = _turn_list(rec, m)
    if found:
        col, turns = found
        if any(m.col("role") in t for t in turns):
            return "messages", f"{col}/{m.col('role')}/{m.col('content')}"
        if any(m.col("from") in t for t in turns):
            return "sharegpt", f"{col}/{m.col('from')}/{m.col('value')}"
    if m.col("instruction") in rec and m.col("output") in rec:
        return "alpaca", f"{m.col('instruction')}/{m.col('input')}/{m.col('output')}"
    if m.col("prompt") in rec and m.col("completion") in rec:
        return "prompt_completion", f"{m.col('prompt')}/{m.col('completion')}"
    return None


def detect(records: list[dict], m: Mapping) -> tuple[str | None, str]:
    """(the most common format of `records`, one log line saying what showed it); (None, the keys seen) when none."""
    votes: Counter = Counter()
    shown: dict[str, str] = {}
    for rec in records:
        got = classify(rec, m)
        if got:
            votes[got[0]] += 1
            shown.setdefault(*got)
    if not votes:
        keys = Counter(k for r in records for k in r)
        return None, ", ".join(k for k, _ in keys.most_common(8)) or "none"
    fmt, n = votes.most_common(1)[0]
    other = f"; {len(records) - n} of another or no format" if n < len(records) else ""
    return fmt, f"format: {fmt}, from keys {shown[fmt]} in the first {len(records)} records{other}"


def _text(v: Any) -> str | None:
    """A turn's text: a string, or OpenAI's list of content parts joined; None for anything else (an image)."""
    if isinstance(v, str):
        return v.strip()
    if v is None:
        return ""
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v):
        return "\n".join(str(p.get("text", "")) for p in v).strip()
    return None


class Drop(Exception):
    """A record that cannot be used: `reason` is its drop reason in prepare_report.json."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _role(name: Any, m: Mapping) -> str:
    role = m.roles.get(str(name).strip().lower())
    if role is None:
        raise Drop(f"unknown_role_{str(name).strip()[:30] or 'empty'}")
    return role


def _from_list(turns: list, role_key: str, content_key: str, m: Mapping) -> list[dict]:
    out = []
    for t in turns:
        if not isinstance(t, dict) or role_key not in t:
            raise Drop("malformed_turn")
        text = _text(t.get(content_key))
        if text is None:
            raise Drop("non_text_turn")
        out.append({"role": _role(t[role_key], m), "content": text})
    return out


def _pairs(history: Any) -> list[dict]:
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise Drop("malformed_history")
    out = []
    for q, a in history:
        qt, at = _text(q), _text(a)
        if qt is None or at is None:
            raise Drop("malformed_history")
        out += [{"role": "user", "content": qt}, {"role": "assistant", "content": at}]
    return out


def _raw_turns(rec: dict, fmt: str, m: Mapping) -> list[dict]:
    """The record's turns in order, roles mapped, texts stripped; Drop when it is not of `fmt`."""
    got = classify(rec, m)
    if got is None:
        raise Drop(MISSING[fmt])
    if got[0] != fmt:
        raise Drop("other_format")
    if fmt in ("messages", "sharegpt"):
        _, turns = _turn_list(rec, m)
        keys = ("role", "content") if fmt == "messages" else ("from", "value")
        out = _from_list(turns, m.col(keys[0]), m.col(keys[1]), m)
        system = _text(rec.get(m.col("system")))  # ShareGPT files may keep the system prompt beside the turns
        return ([{"role": "system", "content": system}] if system else []) + out
    if fmt == "alpaca":
        parts = [_text(rec.get(m.col(k))) for k in ("system", "instruction", "input", "output")]
        if any(p is None for p in parts):
            raise Drop("non_text_field")
        system, instruction, inp, output = parts
        user = f"{instruction}\n\n{inp}" if instruction and inp else instruction or inp
        return ([{"role": "system", "content": system}] if system else []) + _pairs(rec.get(m.col("history"))) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    out = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        v = rec.get(m.col(key))
        if isinstance(v, list):
            out += _from_list(v, m.col("role"), m.col("content"), m)
        else:
            text = _text(v)
            if text is None:
                raise Drop("non_text_field")
            out.append({"role": role, "content": text})
    return out


def to_turns(rec: dict, fmt: str, m: Mapping) -> tuple[list[dict], list[str]]:
    """(cleaned turns, what was repaired) of one record in format `fmt`; Drop(reason) when it cannot be used.

    Cleaning: an empty turn, a system turn after the first turn, or no assistant turn drops the record; consecutive
    turns of one role are merged (blank line between them; counted `merged_consecutive_turns`); turns after the last
    assistant or tool answer that no assistant answers (a conversation ending on a user turn) are removed (counted
    `trailing_turns_removed`)."""
    turns = _raw_turns(rec, fmt, m)
    if any(not t["content"] for t in turns):
        raise Drop("empty_turn")
    if any(t["role"] == "system" for t in turns[1:]):
        raise Drop("misplaced_system_turn")
    fixes: list[str] = []
    merged: list[dict] = []
    for t in turns:
        if merged and merged[-1]["role"] == t["role"] and t["role"] != "tool":
            merged[-1] = {"role": t["role"], "content": merged[-1]["content"] + "\n\n" + t["content"]}
            if "merged_consecutive_turns" not in fixes:
                fixes.append("merged_consecutive_turns")
        else:
            merged.append(dict(t))
    last = max((i for i, t in enumerate(merged) if t["role"] == "assistant"), default=None)
    if last is None:
        raise Drop("no_assistant_turn")
    if last < len(merged) - 1:
        merged = merged[: last + 1]
        fixes.append("trailing_turns_removed")
    return merged, fixes


def unrenderable(tok: Any, messages: list[dict]) -> str | None:
    """Why the tokenizer's chat template cannot train this conversation: `tool_turn_unsupported` when it raises on
    or leaves out a tool turn, `template_error` when it raises otherwise; None when it renders every turn."""
    try:
        tok.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 (a Jinja raise_exception, a template that cannot take this role order)
        return "tool_turn_unsupported" if any(t["role"] == "tool" for t in messages) else "template_error"
    if any(t["role"] == "tool" for t in messages):  # each tool turn, marked, must show in the rendered text
        marked = [dict(t, content=f"<tool-turn-{i}>") if t["role"] == "tool" else t for i, t in enumerate(messages)]
        shown = tok.apply_chat_template(marked, tokenize=False)
        if any(t["role"] == "tool" and f"<tool-turn-{i}>" not in shown for i, t in enumerate(messages)):
            return "tool_turn_unsupported"
    return None
