"""Which trainer trains each architecture: TRL's SFTTrainer (causal) or Seq2SeqTrainer (T5), keyed by `Arch.name`.

Both get this project's loss path (common/training/loss.py). The architecture seam (common/model/arch.py) knows
how a model is loaded and its examples encoded; this table is the one place that knows how each one is trained.
"""
from __future__ import annotations

from typing import Any

from common.data import prompts
from common.model import arch
from common.training import loss


def causal(cfg: Any, plan: Any, model: Any, tok: Any, train_ds: Any, val_ds: Any, args: dict) -> Any:
    from trl import SFTConfig, SFTTrainer

    # examples are truncated when encoded (encode_split); padding-free batches need max_length=None in TRL
    free = plan.padding_free
    sft = SFTConfig(**args, max_length=None if free else cfg.train.max_length, padding_free=free,
                    prediction_loss_only=True)
    cls = loss.trainer_class(SFTTrainer, plan, answer_only=cfg.runtime.answer_only_logits)
    return cls(model=model, args=sft, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
               processing_class=tok)


def seq2seq(cfg: Any, plan: Any, model: Any, tok: Any, train_ds: Any, val_ds: Any, args: dict) -> Any:
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    compute = None
    if cfg.runtime.eval_bleu:
        args.update(predict_with_generate=True, generation_max_length=cfg.train.max_target_length)
        compute = bleu_metric(tok)
    cls = loss.trainer_class(Seq2SeqTrainer, plan, answer_only=False)
    return cls(model=model, args=Seq2SeqTrainingArguments(**args), train_dataset=train_ds,
               eval_dataset=val_ds if len(val_ds) else None, processing_class=tok,
               data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=prompts.IGNORE),
               compute_metrics=compute)


def bleu_metric(tok: Any) -> Any:
    """sacreBLEU of generated val answers at each evaluation (runtime.eval_bleu, seq2seq)."""
    import numpy as np
    import sacrebleu

    def compute(pred: Any) -> dict:
        preds, labels = pred.predictions, pred.label_ids
        preds = np.where(preds < 0, tok.pad_token_id, preds)
        labels = np.where(labels < 0, tok.pad_token_id, labels)
        hyp = tok.batch_decode(preds, skip_special_tokens=True)
        ref = tok.batch_decode(labels, skip_special_tokens=True)
        return {"sacrebleu": sacrebleu.corpus_bleu(hyp, [ref]).score}

    return compute


TRAINERS = {"causal": causal, "seq2seq": seq2seq}


def build(cfg: Any, plan: Any, model: Any, tok: Any, train_ds: Any, val_ds: Any, args: dict) -> Any:
    """The trainer of the recipe's architecture."""
    return TRAINERS[arch.get(cfg).name](cfg, plan, model, tok, train_ds, val_ds, args)
