"""Parity gates: does what leaves the repo (merged model, GGUF file) answer like the model it was made from?

Two measures, both on validation examples, both recorded in merge_report.json / export_report.json:

- token agreement: teacher-forced next-token argmax on whole examples (prompt + answer), the share of positions
  where the two models pick the same token, plus the largest logit difference. Robust: hundreds of positions,
  each independent of the others' rounding. A different pick counts as agreement only at a near-tie: where the
  reference's own logits put the two tokens within one fp16 rounding step of each other (2^-11 of the position's
  largest |logit|), a gap no fp16 computation can resolve; such picks are counted apart (`near_tie_flips`).
  Random-init tiny models have a few (tiny SmolLM2 in llama.cpp: 1 of 540 positions, a gap of 4e-5 at logits of
  0.7); a wrong layout or weight moves logits by far more and is never excused this way. A reference computed in
  bf16 (on a GPU) is only that precise: its own unit roundoff is used where it is coarser (`roundoff`, `unit`).
- answer match: the share of greedy answers (eval.max_new_tokens) that are identical. What a user sees; one
  near-tie early in an answer changes all that follows, so its threshold is lower except where the weights are
  bit-identical (f16 GGUF of an fp16 merge). Another runtime (llama.cpp) computes the same weights with other
  kernels (and q8_0 quantizes the activations too): there an answer also counts when it first leaves the
  reference's own greedy path at a near-tie (`departs_at_near_tie`, counted apart as `near_tie_answers`), a gap
  bounded at that position by the reference's own logits and the file's quant type (ANSWER_TIE), never by what the
  file itself measures: a file that deviates more excuses nothing more.
- long context (`long_reference`): where rope scaling acts only at long positions (Phi-3's longrope long factors
  past original_max_position_embeddings, Llama-3's rope_freqs on wavelengths past original / high_freq_factor),
  next-token agreement on one teacher-forced sequence LONG_TAIL positions past that point.

A gate below its recipe threshold raises ParityError: the step fails and its target is not written.
"""
from __future__ import annotations

from typing import Any

from common.core.io import UserError
from common.model import arch, modeling


NEAR_TIE = 2.0 ** -11  # fp16's unit roundoff: relative gaps below it are within one rounding step
# How close merged/'s own top two candidates may be, as a share of the position's largest |logit|, where a GGUF
# file's greedy answer leaves merged/'s path: 4 units of the quant type's rounding (f16: llama.cpp rounds each
# product's activations to fp16, 2^-11; q8_0: each weight and activation to 1/254 ~ 2^-8 of its 32-block's
# largest), as the two candidates move apart by up to twice one logit's error, itself a sum over rounded products
# and layers. Fixed, never the file's own measured error. Measured on the real SmolLM2-135M (30 layers, 16 val
# prompts, 64-token answers; docs/performance.md): the honest f16 file left merged/'s path nowhere (its logits at
# most 7 units off at a position, 1.6 typically); the honest q8_0 file left it in 13 answers where merged/ led by at
# most 1.85 units; corrupted files (theta x10, k rows, a block scaled) where it led by up to 20% of the logit.
ANSWER_TIE = {"f16": 4 * 2.0 ** -11, "q8_0": 4 * 2.0 ** -8}
# A GGUF file's next-token pick counts as agreement where merged/'s own top two were within one rounding step of the
# file's quant type (a gap that precision cannot resolve): q8_0's flips on an honest file sit at 0.1-1.1% of the
# largest logit (docs/performance.md), an fp16 step (2^-11) excused almost none of them.
TOKEN_TIE = {q: t / 4 for q, t in ANSWER_TIE.items()}
LONG_TAIL = 64  # positions past the point where long-context rope scaling acts (long_reference)


class ParityError(UserError):
    """The exported artifact does not answer like the model that was evaluated."""


def teacher_forced(model: Any, inputs: list[dict]) -> list[Any]:
    """Float32 CPU logits of each whole example."""
    import torch

    dev = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for x in inputs:
            kw = {k: torch.tensor([v], device=dev) for k, v in x.items()}
            outs.append(model(**kw).logits.float().cpu()[0])
    return outs


def roundoff(dtype: Any) -> float:
    """The relative gap below which two logits of the reference count as tied: fp16's unit roundoff (NEAR_TIE), or
    the reference dtype's own where it is coarser (bf16)."""
    import torch

    return max(NEAR_TIE, torch.finfo(dtype).eps / 2) if dtype.is_floating_point else NEAR_TIE


def unit(*models: Any) -> float:
    """The near-tie unit for comparing these models' logits: the coarsest roundoff() of the dtypes they compute in
    (teacher_forced hands back float32 copies, so the dtype is read off the weights)."""
    return max(roundoff(next(m.parameters()).dtype) for m in models)


def agreement(ref: list[Any], got: list[Any], tie_unit: float = NEAR_TIE) -> dict:
    """Next-token argmax agreement (near-ties excused, see above; `tie_unit`: unit() of the models compared) and logit
    differences between two models' logits on the same inputs."""
    same = ties = total = 0
    diffs = []
    for a, b in zip(ref, got):
        pick_a, pick_b = a.argmax(-1), b.argmax(-1)
        gap = a.gather(-1, pick_a[:, None])[:, 0] - a.gather(-1, pick_b[:, None])[:, 0]
        flip = pick_a != pick_b
        tie = flip & (gap <= tie_unit * a.abs().amax(-1))
        same += int((~flip).sum())
        ties += int(tie.sum())
        total += a.shape[0]
        diffs.append(float((a - b).abs().max()))
    return {"positions": total, "token_agreement": (same + ties) / max(1, total), "near_tie_flips": ties,
            "max_abs_logit_diff": max(diffs, default=None), "per_example_max_abs_logit_diff": diffs,
            "max_abs_logit": max((float(a.abs().max()) for a in ref), default=None)}


def greedy(cfg: Any, model: Any, tok: Any, rows: list[dict], desc: str, precision: str = "fp32"
           ) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, greedy answers) of `rows`, encoded with this tokenizer and its chat template, decoded as eval
    decodes (`precision`: the training plan's, run_info.json plan.precision)."""
    a = arch.get(cfg)
    ids = [a.encode_prompt(cfg, tok, ex) for ex in rows]
    return ids, modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, a, cfg.eval.batch_size, desc, precision)


def answer_match(ref: list[str], got: list[str], excused: list[bool] | None = None) -> dict:
    """The share of identical answers; `excused[i]`: answer i differs only past a near-tie (departs_at_near_tie)."""
    equal = [r == g for r, g in zip(ref, got)]
    ties = [not e and bool(x) for e, x in zip(equal, excused or [False] * len(equal))]
    same = [e or t for e, t in zip(equal, ties)]
    first = next((i for i, s in enumerate(same) if not s), None)
    out: dict[str, Any] = {"answers": len(same), "answer_match": sum(same) / max(1, len(same)),
                           "near_tie_answers": sum(ties)}
    if first is not None:
        out["first_difference"] = {"index": first, "reference": ref[first], "got": got[first]}
    return out


def departs_at_near_tie(model: Any, prompt: list[int], answer: list[int], tie: float = 0.0) -> bool:
    """Whether `answer` (token ids another runtime generated greedily after `prompt`, its stop token included)
    first leaves `model`'s own greedy path at a near-tie: the first token `model` would not have picked trails its
    pick by at most max(roundoff(), `tie`) (ANSWER_TIE[quant]) of that position's largest |logit|. False when it
    never leaves it."""
    import torch

    if not answer:
        return False
    ids = torch.tensor([prompt + answer], device=model.device)
    with torch.no_grad():
        raw = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(answer)]
    logits = raw.float()
    got = torch.tensor(answer, device=logits.device)
    off = (logits.argmax(-1) != got).nonzero()
    if not len(off):
        return False
    row = logits[int(off[0])]
    return bool(row.max() - row[got[int(off[0])]] <= max(roundoff(raw.dtype), tie) * float(row.abs().max()))


def long_start(config: Any) -> int | None:
    """The position from which the model's rope scaling acts, or None: Phi-3's longrope switches to its long
    factors once a sequence passes original_max_position_embeddings (transformers; llama.cpp once its context
    does); Llama-3's rope_freqs stretch the wavelengths longer than original / high_freq_factor, which turn a whole
    circle only past that many positions."""
    from common.shipping import export

    rope = export.rope_scaling(config)
    if rope["rope_type"] == "longrope":
        return export.original_context(config)
    if rope["rope_type"] == "llama3":
        return int(rope.get("original_max_position_embeddings", 8192) / rope.get("high_freq_factor", 4.0))
    return None


def long_reference(model: Any, config: Any, inputs: list[dict]) -> dict | None:
    """One teacher-forced sequence LONG_TAIL positions past long_start() (the examples' ids over and over) and
    `model`'s float32 logits at those positions: {"ids", "from", "logits"}; None without long-context scaling."""
    import torch

    start, ids = long_start(config), [t for x in inputs for t in x["input_ids"]]
    n = min((start or 0) + LONG_TAIL, config.max_position_embeddings)
    if start is None or not ids or n <= start:
        return None
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=n - start).logits
    return {"ids": ids, "from": start, "logits": out[0].float().cpu()}


def gate(name: str, figures: dict, min_tokens: float, min_answers: float, fix: str) -> None:
    """Raise ParityError when the figures fall below the thresholds (one line, naming the recipe keys)."""
    bad = []
    if figures["token_agreement"] < min_tokens:
        bad.append(f"next-token agreement {figures['token_agreement']:.3f} < {min_tokens}")
    if figures["answer_match"] < min_answers:
        bad.append(f"identical greedy answers {figures['answer_match']:.2f} < {min_answers}")
    long = figures.get("long_context")
    if long and long["token_agreement"] < min_tokens:
        bad.append(f"next-token agreement past position {long['from']} (long-context rope scaling) "
                   f"{long['token_agreement']:.3f} < {min_tokens}")
    if bad:
        diff = figures.get("first_difference")
        where = (f"; first different answer (#{diff['index']}): {diff['got'][:60]!r} vs {diff['reference'][:60]!r}"
                 if diff else "")
        raise ParityError(f"{name} does not answer like the model it was made from: {', '.join(bad)}{where}. {fix}")
