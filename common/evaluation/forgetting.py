"""The forgetting check: a model's per-token loss on a small general-text set, compared before and after tuning.

The set is data/general/passages.txt (paths.GENERAL_TEXT; one short passage a line; README.md beside it gives its origin and license).
Each passage is split at its middle word: the model reads the first half and is scored on the second, as the mean
cross-entropy per token of that continuation. A decoder-only model reads the whole passage with the first half's
labels masked; an encoder-decoder (T5) reads the first half in its encoder and its decoder is scored on the
second half. T5 was pretrained to write text that follows from its encoder input, so the same question is asked
of both kinds (reconstructing a passage from an empty input would measure something T5 never learned). Base and
tuned losses are compared per passage with the paired bootstrap; lower is better, so "worse" means the tuned model
lost general ability beyond the interval.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from common.core import paths
from common.data.prompts import IGNORE
from common.evaluation import metrics

BATCH = 16  # passages per forward pass
MAX_TOKENS = 128  # a passage's tokens beyond this are not scored (the shipped ones are ~40)


def passages(path: Path = paths.GENERAL_TEXT) -> list[str]:
    """The non-empty lines of the general-text set."""
    if not path.is_file():
        raise FileNotFoundError(f"general-text set {path} is missing; it ships with the repository")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fingerprint(texts: list[str]) -> str:
    """A short hash of the passages (part of the generation caches' keys)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]


def halves(text: str) -> tuple[str, str]:
    """(context, continuation): the passage split at its middle word."""
    words = text.split()
    k = len(words) // 2
    return " ".join(words[:k]), " ".join(words[k:])


def encode(tok: Any, text: str, seq2seq: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels): for a decoder-only model the whole passage with the context's labels at -100; for an
    encoder-decoder the context as encoder input and the continuation (with EOS) as labels."""
    head, tail = halves(text)
    if seq2seq:
        return tok(head).input_ids[:MAX_TOKENS], tok(text_target=tail).input_ids[:MAX_TOKENS]
    ids = tok(text).input_ids[:MAX_TOKENS]
    k = min(len(tok(head).input_ids), len(ids) - 1)  # context tokens: the same pieces as in the whole passage
    return ids, [IGNORE] * k + ids[k:]


def _pad(rows: list[list[int]], value: int) -> list[list[int]]:
    width = max(map(len, rows))
    return [r + [value] * (width - len(r)) for r in rows]


def token_losses(model: Any, tok: Any, texts: list[str], batch_size: int = BATCH) -> list[float]:
    """Mean cross-entropy per scored token of each passage's continuation (nats), in order."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    return losses(model, tok, [encode(tok, t, seq2seq) for t in texts], batch_size)


def losses(model: Any, tok: Any, enc: list[tuple[list[int], list[int]]], batch_size: int = BATCH) -> list[float]:
    """Mean cross-entropy per labelled token (label != -100) of each (input ids, labels) pair (nats), in order: the
    passages' continuations here, the held-out answers of a chat eval (common/evaluation/compare.py)."""
    import torch
    import torch.nn.functional as F

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[float] = []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(enc), batch_size):
            chunk = enc[s:s + batch_size]
            ids = torch.tensor(_pad([x for x, _ in chunk], pad), device=dev)
            mask = torch.tensor(_pad([[1] * len(x) for x, _ in chunk], 0), device=dev)
            labels = torch.tensor(_pad([y for _, y in chunk], IGNORE), device=dev)
            if seq2seq:
                logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                labels = labels[:, 1:]
            scored = labels != IGNORE  # only these positions' logits enter the loss (a large vocabulary is costly)
            nll = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")
            rows = scored.nonzero()[:, 0]
            sums = torch.zeros(len(chunk), device=dev).index_add_(0, rows, nll)
            out += (sums / scored.sum(dim=1).clamp(min=1)).tolist()
    return out


def compare(base: list[float], tuned: list[float], resamples: int) -> dict:
    """Mean losses and the paired change tuned - base over passages, with its CI and verdict (lower is better:
    "worse" means the tuned model's loss is higher beyond the CI)."""
    n = max(1, len(base))
    return {"passages": len(base), "base_loss": sum(base) / n, "tuned_loss": sum(tuned) / n,
            **metrics.paired(tuned, base, resamples, higher_is_better=False)}
