"""Fine-tune the recipe's base model with LoRA (QLoRA when the recipe quantizes and the machine can).

    make train RECIPE=smollm2          # or: python scripts/02_sft_qlora.py --recipe smollm2 [--set train.max_steps=20]

Causal models train with TRL's SFTTrainer on pre-tokenized examples whose labels are -100 on every prompt
token (loss on the answer only, EOS included, so the tuned model stops); with train.loss_on=assistant_turns
every assistant turn of a multi-turn chat is trained. Seq2seq models (T5) train with Seq2SeqTrainer, labels =
the target only. Settings the machine cannot honour (4-bit without bitsandbytes, fp16 on CPU, 8-bit
optimizers without CUDA, Unsloth without CUDA) are replaced, logged, and recorded in run_info.json.

On SageMaker (SM_MODEL_DIR set) the adapter is also copied to SM_MODEL_DIR; data comes from the
SM_CHANNEL_TRAINING channel (common/config.py). HF_TOKEN is read from the environment by the hub client only.

An interrupted run resumes from its last checkpoint (outputs/<run>/checkpoints/) when started again.

Writes outputs/<run>/: checkpoints/, train_log.csv, loss.png, baseline_samples.jsonl (when eval.baseline_samples
> 0), and, last and atomically, adapter/ (LoRA weights, tokenizer with its chat template, run_info.json).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from common import config, modeling, prompts, run, training
from common.run import UserError

log = logging.getLogger("ft")


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
    cls = training.answer_only_trainer(SFTTrainer) if cfg.train.answer_only_logits else SFTTrainer
    return cls(model=model, args=sft, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
               processing_class=tok)


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


def log_callback() -> Any:
    """A callback mirroring the trainer's logs into our log file, with progress and an ETA."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in (logs or {}).items()}
            done = state.global_step - self.step0
            eta = (time.time() - self.t0) / done * (state.max_steps - state.global_step) if done else 0
            log.info("step %d/%d %s eta %.0fs", state.global_step, state.max_steps, logs, eta)

    return LogCallback()


def write_history(history: list[dict], out: Any) -> None:
    keys = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "num_tokens"]
    extra = sorted({k for h in history for k in h} - set(keys))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys + extra, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow(h)
    run.atomic_write_text(out / "train_log.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss (val)")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out / "loss.png")


def baseline_samples(cfg: Any, plan: modeling.Plan, model: Any, tok: Any, rows: list[dict], out: Any) -> None:
    """Base-model answers on the first val examples, written before training (the flan-t5 reference does this)."""
    rows = rows[: cfg.eval.baseline_samples]
    ids = [prompts.encode_seq2seq(tok, r["prompt"], "", cfg.train.max_length, 1)[0] if cfg.model.arch == "seq2seq"
           else prompts.encode_prompt(tok, r["prompt"]) for r in rows]
    answers = modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, cfg.eval.batch_size, "baseline samples",
                                plan.precision)
    run.write_jsonl(out / "baseline_samples.jsonl", [
        {"id": r["id"], "prompt": prompts.prompt_text(r), "target": prompts.reference(r), "base_answer": a}
        for r, a in zip(rows, answers)])


def body(ctx: run.Context) -> None:
    import torch
    from transformers import set_seed

    cfg, rp = ctx.cfg, ctx.paths
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed)
    plan = modeling.plan(cfg)
    log.info("device=%s precision=%s quantization=%s optim=%s", plan.device, plan.precision,
             f"{plan.quant_bits}-bit" if plan.quant_bits else "none", plan.optim)
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    train_rows, val_rows = run.read_jsonl(rp.split("train")), run.read_jsonl(rp.split("val"))
    train_ds = encode_split(cfg, tok, train_rows, "train")
    val_ds = encode_split(cfg, tok, val_rows, "val")
    n_tokens = sum(len(x) for x in train_ds["input_ids"])
    n_answer = sum(sum(1 for y in x if y != -100) for x in train_ds["labels"])
    log.info("train: %d examples, %d tokens (%d answer tokens trained); val: %d examples", len(train_ds), n_tokens,
             n_answer, len(val_ds))

    model = load_for_training(cfg, plan, source)
    if cfg.eval.baseline_samples and not (rp.out / "baseline_samples.jsonl").exists():
        baseline_samples(cfg, plan, model, tok, val_rows, rp.out)

    last = resumable_checkpoint(cfg, rp)  # before the trainer, which creates the folder
    trainer = make_trainer(cfg, plan, model, tok, train_ds, val_ds, str(rp.checkpoints))
    if plan.quant_bits and plan.precision == "fp32":
        # TRL casts a quantized model's trainable weights to bf16 (the QLoRA paper's choice under autocast); without
        # autocast (fp32 on CPU) a bf16 modules_to_save copy would meet fp32 activations, so keep them fp32
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainer.add_callback(log_callback())
    if last:
        log.info("resuming from %s (an earlier run was interrupted)", last)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - t0
    history = trainer.state.log_history
    write_history(history, rp.out)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    info = run.describe(cfg, "train", plan={"device": plan.device, "precision": plan.precision,
                                            "quantization_bits": plan.quant_bits, "optim": plan.optim},
                        replaced=plan.notes, resumed_from=last, train_seconds=round(seconds, 1),
                        global_step=trainer.state.global_step, train_loss=result.training_loss,
                        final_eval_loss=evals[-1] if evals else None, best_eval_loss=min(evals) if evals else None,
                        best_checkpoint=trainer.state.best_model_checkpoint,
                        train_examples=len(train_ds), train_tokens=n_tokens, answer_tokens=n_answer,
                        peak_rss_mb=peak_rss_mb())
    with run.atomic_dir(rp.adapter) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        run.atomic_write_json(tmp / "run_info.json", info)
    if os.environ.get("SM_MODEL_DIR"):  # SageMaker uploads whatever lands here as the model artifact
        shutil.copytree(rp.adapter, os.environ["SM_MODEL_DIR"], dirs_exist_ok=True)
        log.info("copied the adapter to SM_MODEL_DIR=%s", os.environ["SM_MODEL_DIR"])
    log.info("trained %d steps in %.0fs (train loss %.4f, eval loss %s) -> %s", trainer.state.global_step, seconds,
             result.training_loss, evals[-1] if evals else "n/a", rp.adapter)


def resumable_checkpoint(cfg: Any, rp: Any) -> str | None:
    """The last checkpoint of an interrupted run with the same settings and data; stale ones are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    key = hashlib.sha256(json.dumps(config.step_settings(cfg, "train"), sort_keys=True, default=str).encode()
                         + rp.split("train").read_bytes() + rp.split("val").read_bytes()).hexdigest()
    marker = rp.checkpoints / "settings.sha256"
    if rp.checkpoints.is_dir() and (not marker.exists() or marker.read_text() != key):
        log.info("training settings or data changed since the last checkpoints: starting fresh")
        shutil.rmtree(rp.checkpoints)
    rp.checkpoints.mkdir(parents=True, exist_ok=True)
    run.atomic_write_text(marker, key)
    return get_last_checkpoint(str(rp.checkpoints))


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    return run.main("train", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
