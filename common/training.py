"""The answer-only loss used in training and measured by the benchmark.

The usual causal-LM loss computes logits over the whole vocabulary for every position, then throws away the
prompt and padding positions (-100). Here the decoder runs once, and the output layer and cross-entropy run
only on the positions that carry a label. Same loss value (up to float rounding), less work and memory: for
SmolLM2 the 49k-vocab output layer is about a fifth of the model's FLOPs per token. It also skips TRL's
per-step entropy/accuracy metrics, which cost a second pass over the full logits.
"""
from __future__ import annotations

from typing import Any

IGNORE = -100


def _parts(model: Any) -> tuple[Any, Any, Any] | None:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm.config, "is_encoder_decoder", False) or getattr(lm.config, "final_logit_softcapping", None):
        return None
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return lm, decoder, head


def answer_loss(model: Any, inputs: dict) -> tuple[Any, Any]:
    """(sum of token losses over labelled positions, number of such positions)."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    parts = _parts(model)
    target = labels[:, 1:]
    keep = target != IGNORE
    if parts is None:  # architectures this shortcut does not cover: the model's own loss
        out = model(**inputs)
        n = keep.sum()
        return out.loss * n, n
    _, decoder, head = parts
    hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                     position_ids=inputs.get("position_ids"), use_cache=False).last_hidden_state
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, target[keep], reduction="sum"), keep.sum()


def answer_only_trainer(base: type) -> type:
    """A subclass of `base` (TRL's SFTTrainer) whose loss is answer_loss."""

    class AnswerOnlyTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total, n = answer_loss(model, inputs)
            if num_items_in_batch is not None and model.training:
                self.loss_is_scaled_for_ga = True  # normalised over the whole accumulated batch, as HF does
                loss = total / num_items_in_batch
            else:
                self.loss_is_scaled_for_ga = None
                loss = total / n.clamp(min=1)
            return (loss, {"loss": loss}) if return_outputs else loss

    return AnswerOnlyTrainer
