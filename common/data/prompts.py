"""Token-level encoding of chats and seq2seq pairs, identical for training, evaluation, the demo and the benchmark.

Which of the two a recipe uses is decided in common/model/arch.py.

Causal models: a chat (list of role/content messages) is rendered with the tokenizer's chat template turn by
turn, and each piece is tokenized on its own, so the prompt tokens seen in training are exactly the tokens
given to generate() later. Labels are -100 on every prompt token and equal the token ids on every answer
token, including the end-of-turn/EOS token (so the model learns to stop). With loss_on=assistant_turns every
assistant turn of a multi-turn chat is trained; with loss_on=completion only the last one.

Seq2seq models: the prompt is the encoder input; labels are the target tokens (with EOS) and nothing else.
"""
from __future__ import annotations

from typing import Any

IGNORE = -100


def _render(tok: Any, messages: list[dict], gen: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def adds_bos(tok: Any) -> bool:
    """Whether tokenizer(text) would put a BOS in front (Llama/Mistral do, GPT-style tokenizers do not)."""
    cached = getattr(tok, "_ft_adds_bos", None)
    if cached is None:
        ids = tok("a").input_ids
        cached = tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
        tok._ft_adds_bos = cached
    return cached


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids if text else []


def encode_chat(tok: Any, prompt: list[dict], completion: list[dict], max_length: int | None = None,
                all_turns: bool = False) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for prompt + completion; None when truncation leaves no answer token."""
    messages = [*prompt, *completion]
    first_answer = len(prompt)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # rendered text already tokenized
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tok, messages[:i], gen=True)
        full = _render(tok, messages[: i + 1], gen=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("the chat template does not render turns as prefixes of each other; "
                             "choose another prompt.template")
        answer = full[len(prefix):]
        eos = tok.eos_token
        cut = answer.find(eos) if eos else -1
        if cut >= 0:  # train up to and including EOS; what follows belongs to the next prompt
            answer = answer[: cut + len(eos)]
        p_ids = _ids(tok, prefix[len(done):])
        if done and eos and done.endswith(eos):  # tokenized after the EOS it follows, as in the whole chat: a token
            after = _ids(tok, eos + prefix[len(done):])  # that strips the whitespace after it (Phi-3's) takes it
            if after[:1] == [tok.eos_token_id]:
                p_ids = after[1:]
        a_ids = _ids(tok, answer)
        if cut < 0 and tok.eos_token_id is not None:
            a_ids.append(tok.eos_token_id)
        trained = all_turns or i >= first_answer
        ids += p_ids + a_ids
        labels += [IGNORE] * len(p_ids) + (a_ids if trained else [IGNORE] * len(a_ids))
        done = prefix + answer  # `tail` (e.g. a newline after EOS) is tokenized with the next prompt piece
    if adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
    if max_length and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        return None
    return ids, labels


def encode_prompt(tok: Any, prompt: list[dict]) -> list[int]:
    """The ids generation starts from: the same tokens encode_chat gives the prompt."""
    ids = _ids(tok, _render(tok, prompt, gen=True))
    if adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id, *ids]
    return ids


def fit_prompt(tok: Any, prompt: list[dict], max_length: int) -> tuple[list[int], bool]:
    """(ids, whether it was shortened): encode_prompt's ids within max_length with the chat framing kept whole (system
    turn, the last user turn's template around its content, the generation header). A longer prompt loses its oldest
    earlier turns first, then the end of the last user turn's content; cutting the ids instead would drop the
    generation header and the model would continue the user's text."""
    ids = encode_prompt(tok, prompt)
    if len(ids) <= max_length:
        return ids, False
    msgs = [dict(m) for m in prompt]
    while len(ids) > max_length and sum(m["role"] == "user" for m in msgs) > 1:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        end = next((j for j in range(first + 1, len(msgs)) if msgs[j]["role"] == "user"), len(msgs))
        del msgs[first:end]  # the oldest user turn and the answers after it
        ids = encode_prompt(tok, msgs)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    content = _ids(tok, msgs[last]["content"])
    keep = len(content)
    while len(ids) > max_length:
        keep -= len(ids) - max_length  # re-tokenizing at the cut may add a token: loop until it fits
        if keep <= 0:
            raise ValueError(f"the prompt's chat framing alone is longer than max_length={max_length} tokens; "
                             f"raise train.max_length")
        msgs[last]["content"] = tok.decode(content[:keep])
        ids = encode_prompt(tok, msgs)
    return ids, True


def encode_seq2seq(tok: Any, source: str, target: str, max_source: int, max_target: int) -> tuple[list[int], list[int]]:
    src = tok(source, max_length=max_source, truncation=True).input_ids
    tgt = tok(text_target=target, max_length=max_target, truncation=True).input_ids
    if tok.eos_token_id is not None and (not tgt or tgt[-1] != tok.eos_token_id):
        tgt = [*tgt[: max_target - 1], tok.eos_token_id]
    return src, tgt


def prompt_text(example: dict) -> str:
    """A readable prompt for CSV reports: the last user turn (chat) or the source text (seq2seq)."""
    p = example["prompt"]
    if isinstance(p, str):
        return p
    return next((m["content"] for m in reversed(p) if m["role"] == "user"), "")


def reference(example: dict) -> str:
    c = example["completion"]
    return c if isinstance(c, str) else c[-1]["content"]
