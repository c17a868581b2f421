"""The model and trainer a training run uses: encoded splits, LoRA on the planned model, the trainer's arguments,
trackers, and CPU-cheap LoRA dropout.

The loss and the dtype policy are common/training/loss.py; the schedule common/training/schedule.py; logs and plots common/training/history.py.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from common.core.io import UserError
from common.model import arch, modeling
from common.training import attention, loss, schedule, trainers

log = logging.getLogger("ft")


# --------------------------------------------------------------------------- data, model, trainer
def encode_split(cfg: Any, tok: Any, rows: list[dict], name: str) -> Any:
    """Pre-tokenized dataset (input_ids, labels); examples that truncation leaves without an answer are dropped."""
    from datasets import Dataset

    enc = [arch.get(cfg).encode_train(cfg, tok, ex) for ex in rows]
    kept = [e for e in enc if e]
    if len(kept) < len(rows):
        log.warning("%s: %d of %d examples dropped (no answer token left within train.max_length=%d)", name,
                    len(rows) - len(kept), len(rows), cfg.train.max_length)
    if rows and not kept:
        raise UserError(f"every {name} example is longer than train.max_length={cfg.train.max_length}; raise it")
    return Dataset.from_dict({"input_ids": [e[0] for e in kept], "labels": [e[1] for e in kept]})


def fingerprint(*splits: Any) -> str:
    """A hash of encoded splits' token ids and labels: what training reads, whatever rendered it (the chat
    template, the tokenizer, train.max_length, the masking)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for ds in splits:
        for col in ("input_ids", "labels"):
            rows = ds[col]
            h.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
            if rows:
                h.update(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]).tobytes())
    return h.hexdigest()


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias=lc.bias, modules_to_save=lc.modules_to_save, use_rslora=lc.use_rslora,
                      task_type=arch.get(cfg).peft_task_type)


def load_for_training(cfg: Any, plan: Any, source: str) -> Any:
    """The base model (as the plan loads it) with LoRA attached."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = modeling.load_model(cfg, source, plan.quant_bits, dtype=plan.frozen)  # plan.frozen_dtype says why
    if plan.varlen:
        attention.enable(model, plan.device)
        log.info("attention: padding-free rows through %s; other batches through SDPA", plan.varlen_why)
    peft_prepares = plan.quant_bits and plan.frozen == "fp32"  # its fp32 upcast is then a no-op (loaded in fp32)
    if peft_prepares:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif plan.quant_bits:  # the rest of its preparation: get_peft_model freezes, checkpointing below
        log.info("quantized model: norms, embeddings and lm_head stay %s (quantization.upcast_frozen=false)",
                 plan.frozen)
    if cfg.train.gradient_checkpointing and not peft_prepares:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(cfg))
    if cfg.train.fast_dropout and plan.device == "cpu":
        n = use_cheap_dropout(model)
        log.info("LoRA dropout: %d layers use CheapDropout (CPU: 4x fewer random draws, same drop rate)", n)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %.2fM trainable of %.1fM parameters (%.2f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
                    "mlflow": ("mlflow",)}


def trackers(cfg: Any, plan: Any, logdir: Any) -> list[str]:
    """The experiment trackers of runtime.report_to that are installed here (others are replaced, with a note);
    TensorBoard writes its event files to `logdir` (outputs/<run>/tensorboard)."""
    import os

    r = cfg.runtime.report_to
    want = [x for x in (r if isinstance(r, list) else [r]) if x != "none"]
    out = []
    for name in want:
        if any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            out.append(name)
        else:
            plan.note(f"report_to {name} -> none: {' or '.join(TRACKER_PACKAGES[name])} is not installed (pip install "
                      f"{TRACKER_PACKAGES[name][0]})")
    if "tensorboard" in out:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)  # transformers' TensorBoardCallback reads it
        log.info("TensorBoard event files -> %s (tensorboard --logdir %s)", logdir, logdir)
    return out


def training_args(cfg: Any, plan: Any, out: str, has_val: bool, sched: schedule.Schedule | None = None,
                  report_to: list[str] | None = None, batching: Any = None) -> dict:
    """The trainer's arguments; `batching` (common/training/batching.py) splits the effective batch into micro-batches,
    the recipe's own split when None."""
    t = cfg.train
    sched = sched or schedule.Schedule(t.max_steps, t.epochs, bool(t.load_best_model_at_end) and has_val)
    micro, accum = (batching.micro_batch, batching.grad_accum) if batching else (t.batch_size, t.grad_accum)
    return dict(
        output_dir=out, max_steps=sched.max_steps, num_train_epochs=sched.epochs, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps or t.warmup_ratio,
        per_device_train_batch_size=micro, per_device_eval_batch_size=micro, gradient_accumulation_steps=accum,
        optim=plan.optim, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=cfg.runtime.logging_steps,
        eval_strategy=t.eval_strategy if has_val else "no", eval_steps=t.eval_steps, save_strategy=t.save_strategy,
        save_steps=t.save_steps, save_total_limit=cfg.runtime.save_total_limit, load_best_model_at_end=sched.load_best,
        metric_for_best_model="eval_loss", greater_is_better=False, seed=t.seed, data_seed=t.seed,
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16", use_cpu=plan.device == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to=report_to or "none", remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
        activation_checkpointing=False,  # already applied to the model above, once (transformers 5.23 name)
    )


def make_trainer(cfg: Any, plan: Any, model: Any, tok: Any, train_ds: Any, val_ds: Any, out: str,
                 sched: schedule.Schedule | None = None, report_to: list[str] | None = None, batching: Any = None) -> Any:
    """The architecture's trainer with this project's loss, autocast and fp32 trainable weights."""
    args = training_args(cfg, plan, out, len(val_ds) > 0, sched, report_to, batching)
    trainer = trainers.build(cfg, plan, model, tok, train_ds, val_ds, args)
    loss.align_dtypes(trainer.model, plan)  # after the trainer: TRL casts trainable weights in its __init__
    return trainer


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
