"""Training pieces shared by 02_sft_qlora and the benchmark: datasets, LoRA, dtypes, schedule, trainer, loss.

Answer-only loss: the usual causal-LM loss computes logits over the whole vocabulary for every position, then
throws away the prompt and padding positions (-100). Here the decoder runs once, and the output layer and
cross-entropy run only on the positions that carry a label. Same loss value (up to float rounding), less work
and memory: for SmolLM2 the 49k-vocab output layer is about a fifth of the model's FLOPs per token. It also
skips TRL's per-step entropy/accuracy metrics, which cost a second pass over the full logits.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import math
import time
from io import StringIO
from dataclasses import dataclass, field
from typing import Any

from common import arch, attention, modeling
from common.io import UserError, atomic_write_text

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


# --------------------------------------------------------------------------- dtypes: decided here, on purpose
# Trainable weights (LoRA A/B, modules_to_save copies such as lm_head/embed_tokens) are always fp32 master weights:
# fp16 mixed precision needs them (its gradient scaler refuses fp16 gradients), and a bf16 copy (TRL casts a
# quantized model's trainable weights to bf16; a modules_to_save copy inherits a bf16 base's dtype) would meet fp32
# activations wherever no autocast is active. Frozen weights keep the dtype they were loaded in (load_for_training).
# Activations: the whole loss computation, our answer-only path included, runs under autocast in plan.precision
# (bf16 or fp16), not only model.forward (the part accelerate wraps), so every matmul sees one dtype.
def autocast(plan: modeling.Plan) -> Any:
    """The autocast context of the plan's precision (a no-op for fp32)."""
    import contextlib

    import torch

    if plan.precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=modeling.torch_dtype(plan.precision))


def align_dtypes(model: Any, plan: modeling.Plan) -> dict[str, int]:
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


def trainer_class(base: type, plan: modeling.Plan, answer_only: bool) -> type:
    """A subclass of `base` whose loss runs under the plan's autocast; with answer_only, the loss is answer_loss
    (with Liger's fused kernel when plan.liger)."""

    class Trainer(base):
        _params: int | None = None  # the model's non-embedding parameter count (fixed while it trains)
        trained_tokens: Any = 0  # non-padding input tokens of every training micro-batch (a tensor: no sync)

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
                mask = inputs.get("attention_mask")
                self.trained_tokens = self.trained_tokens + (mask.sum() if mask is not None
                                                             else inputs["input_ids"].numel())
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


# --------------------------------------------------------------------------- data, model, schedule, trainer
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


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      bias=lc.bias, modules_to_save=lc.modules_to_save, use_rslora=lc.use_rslora,
                      task_type=arch.get(cfg).peft_task_type)


def load_for_training(cfg: Any, plan: modeling.Plan, source: str) -> Any:
    """The base model (as the plan loads it) with LoRA attached."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = modeling.load_model(cfg, source, plan.quant_bits, dtype=plan.frozen)  # modeling.frozen_dtype says why
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


@dataclass
class Schedule:
    """How long to train, after fitting the recipe's request to the data, and whether to keep the best checkpoint."""

    max_steps: int
    epochs: float
    load_best: bool
    notes: list[str] = field(default_factory=list)


def schedule(cfg: Any, n_train: int, has_val: bool) -> Schedule:
    """Cap training at train.max_epochs passes over the data (a recipe's step count meant for a large data set
    would otherwise overfit a small one), and keep the best validation checkpoint when there is a validation
    split (train.load_best_model_at_end: null = yes when evaluation runs and checkpoints line up with it)."""
    t = cfg.train
    s = Schedule(t.max_steps, t.epochs, False)
    per_step = t.batch_size * t.grad_accum
    cap = t.max_epochs
    if cap and n_train:
        if t.max_steps > 0 and t.max_steps * per_step > cap * n_train:
            # the trainer evaluates and saves at the last step too (transformers' DefaultFlowCallback), so the last
            # weights compete for the best checkpoint without rounding the steps down to an evaluation interval
            steps = max(1, math.ceil(cap * n_train / per_step))
            s.notes.append(f"train.max_steps {t.max_steps} -> {steps}: {t.max_steps} steps x {per_step} examples "
                           f"would be {t.max_steps * per_step / n_train:.1f} passes over {n_train} train examples; "
                           f"train.max_epochs={cap:g} caps it")
            s.max_steps = steps
        elif t.max_steps <= 0 and t.epochs > cap:
            s.notes.append(f"train.epochs {t.epochs:g} -> {cap:g}: capped by train.max_epochs")
            s.epochs = cap
    evaluates = has_val and t.eval_strategy != "no"
    if t.load_best_model_at_end is None:
        aligned = t.save_strategy == t.eval_strategy and (
            t.eval_strategy != "steps" or (t.eval_steps and t.save_steps % t.eval_steps == 0))
        s.load_best = bool(evaluates and aligned)
        if evaluates and not aligned:
            s.notes.append("best-checkpoint selection off: checkpoints (train.save_*) do not line up with "
                           "evaluations (train.eval_*)")
    else:
        s.load_best = t.load_best_model_at_end and evaluates
    for n in s.notes:
        log.warning("schedule: %s", n)
    return s


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
                    "mlflow": ("mlflow",)}


def trackers(cfg: Any, plan: modeling.Plan, logdir: Any) -> list[str]:
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


def training_args(cfg: Any, plan: modeling.Plan, out: str, has_val: bool, sched: Schedule | None = None,
                  report_to: list[str] | None = None, batching: Any = None) -> dict:
    """The trainer's arguments; `batching` (common/batching.py) splits the effective batch into micro-batches,
    the recipe's own split when None."""
    t = cfg.train
    sched = sched or Schedule(t.max_steps, t.epochs, bool(t.load_best_model_at_end) and has_val)
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


def make_trainer(cfg: Any, plan: modeling.Plan, model: Any, tok: Any, train_ds: Any, val_ds: Any, out: str,
                 sched: Schedule | None = None, report_to: list[str] | None = None, batching: Any = None) -> Any:
    """The architecture's trainer with this project's loss, autocast and fp32 trainable weights."""
    args = training_args(cfg, plan, out, len(val_ds) > 0, sched, report_to, batching)
    trainer = arch.get(cfg).trainer(cfg, plan, model, tok, train_ds, val_ds, args)
    align_dtypes(trainer.model, plan)  # after the trainer: TRL casts trainable weights in its __init__
    if cfg.runtime.compile:
        n, kinds = compile_blocks(trainer.model)
        log.info("runtime.compile: %d %s blocks compiled in place (torch.compile, dynamic shapes); the first step "
                 "compiles them (a minute or more), later steps reuse it", n, "/".join(kinds))
    return trainer


def compile_blocks(model: Any) -> tuple[int, list[str]]:
    """torch.compile every repeated block of the model in place (the classes transformers names in
    `_no_split_modules`: LlamaDecoderLayer, MistralDecoderLayer, T5Block). In place (nn.Module.compile) keeps the
    module tree and parameter names, so PEFT saves the same adapter; the blocks share one compiled graph (torch
    inlines nn.Modules, parameters are graph inputs) and dynamic shapes avoid a recompile per sequence length.
    Outside the blocks (embedding, the answer-only output layer and loss) stays eager. Returns (count, classes)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"runtime.compile=true: {type(lm).__name__} names no repeated blocks (_no_split_modules) to "
                        f"compile; set runtime.compile=false")
    for b in blocks:
        b.compile(dynamic=True)
    return len(blocks), sorted({type(b).__name__ for b in blocks})


# --------------------------------------------------------------------------- progress and history
def step_clock() -> Any:
    """A callback adding up the time spent in training steps only (forward, backward, optimizer), not in the
    evaluations, checkpoint saves and logging between them: run_info's training speed divides by this."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        seconds = 0.0
        steps = 0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if modeling.cuda():
                import torch

                torch.cuda.synchronize()  # the step's queued kernels belong to the step
            self.seconds += time.perf_counter() - self._t
            self.steps += 1

    return StepClock()


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
    """train_log.csv (every logged value by step) and loss.png (train and val loss), atomically."""
    keys = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "num_tokens"]
    extra = sorted({k for h in history for k in h} - set(keys))
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=keys + extra, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_text(out / "train_log.csv", buf.getvalue())

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
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out / "loss.png")


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
