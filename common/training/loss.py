"""The training loss: answer-only output layer + cross-entropy (optionally Liger's fused kernel) under the plan's
autocast, fp32 trainable weights, and the trainer subclass that uses them.

Answer-only loss: the usual causal-LM loss computes logits over the whole vocabulary for every position, then
throws away the prompt and padding positions (-100). Here the decoder runs once, and the output layer and
cross-entropy run only on the positions that carry a label. Same loss value (up to float rounding), less work
and memory: for SmolLM2 the 49k-vocab output layer is about a fifth of the model's FLOPs per token. It also
skips TRL's per-step entropy/accuracy metrics, which cost a second pass over the full logits.
"""
from __future__ import annotations

import logging
from typing import Any

from common.data.prompts import (
    IGNORE,  # the label of a position without loss, as prompts writes it
)
from common.model import dtypes
from common.training import attention

log = logging.getLogger("ft")


def _parts(model: Any) -> tuple[Any, Any, Any] | None:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm.config, "is_encoder_decoder", False) or getattr(lm.config, "final_logit_softcapping", None):
        return None
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return lm, decoder, head


def wrapped(model: Any) -> bool:
    """Whether the model is inside DDP's wrapper (several processes)."""
    return type(model).__name__ == "DistributedDataParallel"


def bounds(inputs: dict) -> dict:
    """The example boundaries of a padding-free row (TRL's collator: cu_seq_lens_q/k, max_length_q/k), passed on to
    the attention (varlen kernels read them instead of deriving them from position_ids with a sync per layer)."""
    return {k: inputs[k] for k in attention.BOUNDARY_KEYS if k in inputs}


def answer_loss(model: Any, inputs: dict, liger: bool = False) -> tuple[Any, Any]:
    """(sum of token losses over labelled positions, number of such positions). With liger, the output layer and
    cross-entropy run as Liger's fused kernel (chunked: the logits are never held whole). Under a multi-process
    engine the model is called through its wrapper (DDP synchronises gradients only for a forward it ran), asking
    for logits only at the positions that hold a label in some row (`logits_to_keep`)."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    target = labels[:, 1:]
    keep = target != IGNORE
    if wrapped(model) and _parts(getattr(model, "module", model)) is not None:
        pos = keep.any(0).nonzero().squeeze(1)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    position_ids=inputs.get("position_ids"), logits_to_keep=pos, use_cache=False, **bounds(inputs))
        sel = keep[:, pos]
        return F.cross_entropy(out.logits[sel].float(), target[:, pos][sel], reduction="sum"), keep.sum()
    parts = _parts(model)
    if parts is None:  # architectures this shortcut does not cover: the model's own loss
        out = model(**inputs)
        n = keep.sum()
        return out.loss * n, n
    _, decoder, head = parts
    hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                     position_ids=inputs.get("position_ids"), use_cache=False, **bounds(inputs)).last_hidden_state
    h = hidden[:, :-1][keep]
    if liger:
        w, b = head.weight, getattr(head, "bias", None)  # PEFT's modules_to_save wrapper forwards .weight
        # the kernel multiplies in the activations' dtype; a trainable fp32 head is cast (its gradient stays fp32)
        return liger_loss()(w.to(h.dtype), h, target[keep], None if b is None else b.to(h.dtype)), keep.sum()
    logits = head(h).float()
    return F.cross_entropy(logits, target[keep], reduction="sum"), keep.sum()


_LIGER: list = []


def liger_loss() -> Any:
    if not _LIGER:
        import torch
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        _LIGER.append(LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32))
    return _LIGER[0]


# Trainable weights (LoRA A/B, modules_to_save copies such as lm_head/embed_tokens) are always fp32 master weights:
# fp16 mixed precision needs them (its gradient scaler refuses fp16 gradients), and a bf16 copy (TRL casts a
# quantized model's trainable weights to bf16; a modules_to_save copy inherits a bf16 base's dtype) would meet fp32
# activations wherever no autocast is active. Frozen weights keep the dtype they were loaded in (load_for_training).
# Activations: the whole loss computation, our answer-only path included, runs under autocast in plan.precision
# (bf16 or fp16), not only model.forward (the part accelerate wraps), so every matmul sees one dtype.
def autocast(plan: Any) -> Any:
    """The autocast context of the plan's precision (a no-op for fp32)."""
    import contextlib

    import torch

    if plan.precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=dtypes.torch_dtype(plan.precision))


def align_dtypes(model: Any, plan: Any) -> dict[str, int]:
    """Cast every trainable weight to fp32 (see above); returns {dtype it had: number of tensors cast}."""
    import torch

    cast: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            cast[str(p.dtype).replace("torch.", "")] = cast.get(str(p.dtype).replace("torch.", ""), 0) + 1
            p.data = p.data.float()
    if cast:
        log.info("trainable weights: %s tensors cast to fp32 master weights (precision %s)",
                 ", ".join(f"{n} {k}" for k, n in cast.items()), plan.precision)
    return cast


def batch_tokens(model: Any, inputs: dict) -> Any:
    """Non-padding tokens a micro-batch trains on: the input tokens, and for an encoder-decoder model also the
    target tokens its decoder reads (labels other than -100; a decoder-only model's labels are its inputs)."""
    mask = inputs.get("attention_mask")
    n = mask.sum() if mask is not None else inputs["input_ids"].numel()
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and inputs.get("labels") is not None:
        n = n + (inputs["labels"] != IGNORE).sum()
    return n


def trainer_class(base: type, plan: Any, answer_only: bool) -> type:
    """A subclass of `base` whose loss runs under the plan's autocast; with answer_only, the loss is answer_loss
    (with Liger's fused kernel when plan.liger)."""

    class Trainer(base):
        _params: int | None = None  # the model's non-embedding parameter count (fixed while it trains)
        trained_tokens: Any = 0  # batch_tokens of every training micro-batch here (a tensor: no sync)

        def floating_point_ops(self, inputs):
            """HF's count (6 x tokens x non-embedding parameters), with the parameters counted once: HF walks every
            module and parameter for it on each micro-batch (12-14 ms for a 2,500-module LoRA model on this CPU)."""
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._params is None:
                self._params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._params

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.trained_tokens = self.trained_tokens + batch_tokens(model, inputs)
            with autocast(plan):
                if not answer_only:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                total, n = answer_loss(model, inputs, plan.liger)
            if num_items_in_batch is not None and model.training:
                self.loss_is_scaled_for_ga = True  # normalised over the whole accumulated batch, as HF does
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:  # the count spans every process; DDP then averages
                    loss = loss * self.accelerator.num_processes  # the gradients: undo that, as HF's loss does
            else:
                self.loss_is_scaled_for_ga = None
                loss = total / n.clamp(min=1)
            return (loss, {"loss": loss}) if return_outputs else loss

    Trainer.__name__ = Trainer.__qualname__ = f"{'AnswerOnly' if answer_only else ''}{base.__name__}"
    return Trainer
