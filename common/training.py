"""Training pieces shared by 02_sft_qlora and the benchmark: datasets, LoRA, the trainer, answer-only loss.

Answer-only loss: the usual causal-LM loss computes logits over the whole vocabulary for every position, then
throws away the prompt and padding positions (-100). Here the decoder runs once, and the output layer and
cross-entropy run only on the positions that carry a label. Same loss value (up to float rounding), less work
and memory: for SmolLM2 the 49k-vocab output layer is about a fifth of the model's FLOPs per token. It also
skips TRL's per-step entropy/accuracy metrics, which cost a second pass over the full logits.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from common import modeling, prompts
from common.run import UserError

log = logging.getLogger("ft")
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


def encode_split(cfg: Any, tok: Any, rows: list[dict], name: str) -> Any:
    """Pre-tokenized dataset (input_ids, labels); examples that truncation leaves without an answer are dropped."""
    from datasets import Dataset

    ids, labels = [], []
    for ex in rows:
        if cfg.model.arch == "seq2seq":
            src, tgt = prompts.encode_seq2seq(tok, ex["prompt"], ex["completion"], cfg.train.max_length,
                                              cfg.train.max_target_length)
            ids.append(src)
            labels.append(tgt)
            continue
        enc = prompts.encode_chat(tok, ex["prompt"], ex["completion"], cfg.train.max_length,
                                  all_turns=cfg.train.loss_on == "assistant_turns")
        if enc:
            ids.append(enc[0])
            labels.append(enc[1])
    if len(ids) < len(rows):
        log.warning("%s: %d of %d examples dropped (no answer token left within train.max_length=%d)", name,
                    len(rows) - len(ids), len(rows), cfg.train.max_length)
    if rows and not ids:
        raise UserError(f"every {name} example is longer than train.max_length={cfg.train.max_length}; raise it")
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig, TaskType

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias=lc.bias, modules_to_save=lc.modules_to_save, use_rslora=lc.use_rslora,
                      task_type=TaskType.SEQ_2_SEQ_LM if cfg.model.arch == "seq2seq" else TaskType.CAUSAL_LM)


def load_for_training(cfg: Any, plan: modeling.Plan, source: str) -> Any:
    """The base model with LoRA attached: Unsloth's fast path when asked for and possible, else HF + PEFT."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.model.unsloth:
        if importlib.util.find_spec("unsloth") and plan.device == "cuda":
            from unsloth import FastLanguageModel

            lc = cfg.lora
            model, _ = FastLanguageModel.from_pretrained(model_name=source, max_seq_length=cfg.train.max_length,
                                                         dtype=None, load_in_4bit=plan.quant_bits == 4)
            return FastLanguageModel.get_peft_model(
                model, r=lc.r, target_modules=lc.target_modules, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                bias=lc.bias, use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
                random_state=cfg.train.seed, use_rslora=lc.use_rslora, loftq_config=None)
        why = "not installed" if not importlib.util.find_spec("unsloth") else "it needs CUDA"
        plan.note(f"Unsloth -> Hugging Face + PEFT: Unsloth {why} (same LoRA settings and result files)")
    master = "fp32" if plan.device == "cpu" or plan.precision == "fp32" else plan.precision
    model = modeling.load_model(cfg, source, plan.quant_bits, dtype="fp32" if plan.quant_bits else master)
    if plan.quant_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(cfg))
    if cfg.train.fast_dropout and plan.device == "cpu":
        n = use_cheap_dropout(model)
        log.info("LoRA dropout: %d layers use CheapDropout (CPU: 4x fewer random draws, same drop rate)", n)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %.2fM trainable of %.1fM parameters (%.2f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def training_args(cfg: Any, plan: modeling.Plan, out: str, has_val: bool) -> dict:
    t = cfg.train
    eval_strategy = t.eval_strategy if has_val else "no"
    return dict(
        output_dir=out, max_steps=t.max_steps, num_train_epochs=t.epochs, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps or t.warmup_ratio,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, optim=plan.optim, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, eval_strategy=eval_strategy,
        eval_steps=t.eval_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, load_best_model_at_end=t.load_best_model_at_end and has_val,
        metric_for_best_model="eval_loss", greater_is_better=False, seed=t.seed, data_seed=t.seed,
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16", use_cpu=plan.device == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        gradient_checkpointing=False,  # already applied to the model above, once
    )


def make_trainer(cfg: Any, plan: modeling.Plan, model: Any, tok: Any, train_ds: Any, val_ds: Any, out: str) -> Any:
    args = training_args(cfg, plan, out, len(val_ds) > 0)
    if cfg.model.arch == "seq2seq":
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        compute = None
        if cfg.train.eval_bleu:
            args.update(predict_with_generate=True, generation_max_length=cfg.train.max_target_length)
            compute = bleu_metric(tok)
        return Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**args), train_dataset=train_ds,
                              eval_dataset=val_ds if len(val_ds) else None, processing_class=tok,
                              data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100),
                              compute_metrics=compute)
    from trl import SFTConfig, SFTTrainer

    sft = SFTConfig(**args, max_length=cfg.train.max_length, packing=cfg.train.packing, prediction_loss_only=True)
    cls = answer_only_trainer(SFTTrainer) if cfg.train.answer_only_logits else SFTTrainer
    trainer = cls(model=model, args=sft, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
                  processing_class=tok)
    if plan.quant_bits and plan.precision == "fp32":
        # TRL casts a quantized model's trainable weights to bf16 (the QLoRA paper's choice under autocast); without
        # autocast (fp32 on CPU) a bf16 modules_to_save copy would meet fp32 activations, so keep them fp32
        import torch

        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainer


def bleu_metric(tok: Any) -> Any:
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


def cheap_dropout_class() -> type:
    import torch

    class CheapDropout(torch.nn.Dropout):
        """Dropout whose mask comes from 4x fewer random draws: each 64-bit draw gives four 15-bit lanes, and a lane
        is dropped when below round(p * 32768) (p to within 1/32768). On a CPU, torch's per-element Bernoulli
        sampling was a fifth of a SmolLM2 LoRA step (210 dropout calls; make bench). The mask is kept as bools
        (1 byte, not a 4-byte float), so activations also take less memory. Eval mode and p=0 pass x through."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            n = x.numel()
            bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
            keep = (bits.view(torch.int16)[:n].view(x.shape) & 0x7FFF) >= round(self.p * 32768)
            return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)

    return CheapDropout


def use_cheap_dropout(model: Any) -> int:
    """Swap the nn.Dropout of every LoRA layer for CheapDropout (same p); returns how many were swapped."""
    import torch

    cls, n = cheap_dropout_class(), 0
    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if type(d) is torch.nn.Dropout and d.p > 0:
                    drops[name] = cls(d.p)
                    n += 1
    return n
