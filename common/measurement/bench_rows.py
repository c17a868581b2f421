"""What each `make bench` row trains: the variants (ours, ours with one choice flipped, plain TRL, the reference
setups' way) and the trainer each one builds, with a collator wrapper that counts the tokens of every batch."""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from common.core import config
from common.data import prompts
from common.model import arch, modeling
from common.training import batching, builder, loss
from common.training import plan as run_plan

log = logging.getLogger("ft")


REFERENCE_LENGTH = 512  # the reference setups pad (and truncate) every example to this many tokens


def variants(cfg: config.Config, plan: run_plan.Plan) -> dict[str, dict]:
    """name -> {kind, sets (recipe overrides), what}; the ablations undo one of the recipe's speed choices."""
    other = "bf16" if plan.precision == "fp32" else "fp32"
    out = {"ours": {"kind": "ours", "sets": [], "what": "this project, as the recipe configures it"},
           f"ours-{other}": {"kind": "ours", "sets": [f"train.precision={other}"],
                             "what": f"ours in {other}" + (" autocast" if other == "bf16" else "")}}
    if cfg.runtime.answer_only_logits and arch.get(cfg).chat_baselines:
        out["ours-full-logits"] = {"kind": "ours", "sets": ["runtime.answer_only_logits=false"],
                                   "what": "ours with full-vocabulary logits and TRL's per-step metrics"}
    if cfg.train.fast_dropout and plan.device == "cpu" and cfg.lora.dropout > 0:
        out["ours-torch-dropout"] = {"kind": "ours", "sets": ["train.fast_dropout=false"],
                                     "what": "ours with PEFT's own LoRA dropout (per-element Bernoulli draws)"}
    if not cfg.train.gradient_checkpointing:
        out["ours-grad-ckpt"] = {"kind": "ours", "sets": ["train.gradient_checkpointing=true"],
                                 "what": "ours with gradient checkpointing (less memory, more compute)"}
    if plan.device == "cuda":  # what each GPU choice pays (on a CPU auto keeps the recipe's split and padding)
        t, r = cfg.train, cfg.runtime
        if r.micro_batch == "auto":
            out["ours-recipe-split"] = {"kind": "ours", "sets": [f"runtime.micro_batch={t.batch_size}"],
                                        "what": f"ours at the recipe's micro-batch {t.batch_size} x {t.grad_accum}"}
        if plan.padding_free:
            out["ours-padded"] = {"kind": "ours", "sets": ["runtime.padding_free=false"],
                                  "what": "ours with padded micro-batches instead of padding-free rows"}
        if plan.varlen:
            out["ours-sdpa-mask"] = {"kind": "ours", "sets": ["runtime.varlen_attention=false"],
                                     "what": "ours with SDPA over the padding-free row's block-diagonal mask instead "
                                             "of the varlen kernel"}
        elif plan.padding_free and cfg.model.attn_implementation == "sdpa":
            out["ours-varlen"] = {"kind": "ours", "sets": ["runtime.varlen_attention=true"],
                                  "what": "ours with padding-free rows through PyTorch's varlen flash kernel"}
        if plan.liger:
            out["ours-no-liger"] = {"kind": "ours", "sets": ["runtime.liger=false"],
                                    "what": "ours without Liger's fused output layer + cross-entropy"}
        elif importlib.util.find_spec("liger_kernel") and r.answer_only_logits and arch.get(cfg).chat_baselines:
            out["ours-liger"] = {"kind": "ours", "sets": ["runtime.liger=true"],
                                 "what": "ours with Liger's fused output layer + cross-entropy"}
        if t.gradient_checkpointing:
            out["ours-no-grad-ckpt"] = {"kind": "ours", "sets": ["train.gradient_checkpointing=false"],
                                        "what": "ours without gradient checkpointing"}
        if cfg.model.attn_implementation == "sdpa":
            out["ours-eager-attn"] = {"kind": "ours", "sets": ["model.attn_implementation=eager"],
                                      "what": "ours with eager attention instead of SDPA"}
        if plan.quant_bits and plan.precision != "fp32":  # the other choice of quantization.upcast_frozen
            upcast = plan.frozen == "fp32"
            other, flip = (plan.precision, "false") if upcast else ("fp32", "true")
            out[f"ours-{other}-frozen"] = {"kind": "ours", "sets": [f"quantization.upcast_frozen={flip}"],
                                           "what": f"ours with the norms, embeddings and lm_head in {other} "
                                                   f"(quantization.upcast_frozen={flip})"}
    if not arch.get(cfg).chat_baselines:  # plain TRL SFT and the padded reference are decoder-only setups
        return out
    out["trl-defaults"] = {"kind": "trl", "sets": [], "what": "plain TRL SFTTrainer, all defaults, same LoRA"}
    out["trl-defaults-fp32"] = {"kind": "trl", "sets": [], "bf16": False,
                                "what": "plain TRL SFTTrainer, all defaults but bf16=False"}
    out["reference"] = {"kind": "reference", "sets": [],
                        "what": f"padded to {REFERENCE_LENGTH} tokens, loss on every token (HF Trainer + PEFT)"}
    return out


def counting(collate: Any, counts: list) -> Any:
    """Wrap a data collator to record (non-padding, total, labelled) tokens of every batch, in order."""
    def wrapped(features: list) -> Any:
        batch = collate(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())  # padding-free batches have no mask
        labels = batch.get("labels")
        counts.append((real, int(ids.numel()), int((labels != loss.IGNORE).sum()) if labels is not None else real))
        return batch

    return wrapped


def build_ours(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str, capacity: float | None) -> Any:
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    ds = builder.encode_split(cfg, tok, rows, "train")
    model = builder.load_for_training(cfg, plan, source)
    split = batching.choose(cfg, plan, model, ds, tok.pad_token_id, capacity)
    log.info("%s", split.line())
    return builder.make_trainer(cfg, plan, model, tok, ds, ds.select([]), out, batching=split)


def build_reference(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str) -> Any:
    """The reference setups' training, none of this project's speed choices: fixed-length padding, labels = every
    real token, the model's own loss, HF + PEFT as their notebooks load it (prepare_model_for_kbit_training when
    quantized, PEFT's own dropout), the recipe's precision through TrainingArguments only."""
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator

    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    pad = tok.pad_token_id
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        enc = prompts.encode_chat(tok, r["prompt"], r["completion"], REFERENCE_LENGTH)
        if not enc:
            continue
        ids = enc[0]
        fill = REFERENCE_LENGTH - len(ids)
        cols["input_ids"].append(ids + [pad] * fill)
        cols["attention_mask"].append([1] * len(ids) + [0] * fill)
        cols["labels"].append(ids + [loss.IGNORE] * fill)
    model = modeling.load_model(cfg, source, plan.quant_bits, "fp32")
    if plan.quant_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, builder.lora_config(cfg))
    args = builder.training_args(cfg, plan, out, has_val=False)
    args["train_sampling_strategy"] = "random"  # fixed-length batches: nothing to group
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Dataset.from_dict(cols),
                   data_collator=default_data_collator)


def build_trl(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str, bf16: bool | None) -> Any:
    """Plain TRL: the tokenizer's own chat template, a prompt/completion dataset, SFTConfig defaults."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    source = modeling.model_source(cfg)
    tok = AutoTokenizer.from_pretrained(source)
    if not tok.chat_template:  # a tokenizer without one: the recipe's template, as a TRL user would set it
        tok = modeling.load_tokenizer(cfg, source)
    model = modeling.load_model(cfg, source, plan.quant_bits, "fp32")
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    t = cfg.train
    kw: dict[str, Any] = dict(output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                              gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, seed=t.seed,
                              report_to="none", save_strategy="no", use_cpu=plan.device == "cpu")
    if bf16 is not None:
        kw["bf16"] = bf16
    return SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                      peft_config=builder.lora_config(cfg))
