"""Fine-tune the recipe's base model with LoRA (QLoRA when the recipe quantizes and the machine can).

    make train RECIPE=smollm2          # or: python scripts/02_sft_qlora.py --recipe smollm2 [--set train.max_steps=20]
    make train NPROC=2                 # several processes (DDP) under accelerate launch (common/core/dist.py); rank 0 writes

The recipe's architecture (common/model/arch.py) picks the trainer: TRL's SFTTrainer for decoder-only chat models,
on pre-tokenized examples whose labels are -100 on every prompt token (loss on the answer only, EOS included, so
the tuned model stops; with train.loss_on=assistant_turns every assistant turn of a multi-turn chat is trained);
for encoder-decoder models the HF trainer with labels = the target only.

How the run executes is one record, the run plan (common/training/plan.py): device, precision, quantization, padding-free rows, attention, the micro-batch split of the effective batch (runtime.micro_batch: auto
probes the GPU's memory; common/training/batching.py), the schedule (a step count meant for more data than there is is
capped at train.max_epochs passes and the best validation checkpoint is kept; common/training/schedule.py), and what this
machine could not honour (4-bit without bitsandbytes, fp16 on CPU, 8-bit optimizers without CUDA). It is logged
once as a table and written to run_info.json (`plan`). The training speed there counts the non-padding tokens of
the training micro-batches over the time spent in training steps only (evaluations and saves left out).

On SageMaker (SM_MODEL_DIR set) the adapter is also copied to SM_MODEL_DIR; data comes from the
SM_CHANNEL_TRAINING channel (common/core/config.py). HF_TOKEN is read from the environment by the hub client only.

An interrupted run resumes from its last checkpoint (outputs/<run>/checkpoints/) when started again with the same
train-defining settings, data and encoded tokens (checkpoint_key: a changed runtime.* setting keeps the checkpoints;
anything else, a changed chat template included, starts fresh); a checkpoint at the schedule's end is never resumed.

run_info.json's train_seconds is the wall time of every segment of the run: each checkpoint keeps the running total
(train_seconds.json, common/training/history.py) and a resumed run adds its own segment to the one it went on from.

Writes outputs/<run>/: checkpoints/, train_log.csv, loss.png, baseline_samples.jsonl (when eval.baseline_samples
> 0), tensorboard/ (when runtime.report_to has tensorboard; wandb, trackio and mlflow log to their own places), and,
last and atomically, adapter/ (LoRA weights, tokenizer with its chat template, trainer_state.json, run_info.json).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from common.core import dist, io, metadata, run, stamps
from common.data import prompts
from common.model import arch, modeling
from common.training import batching, builder, footprint, history, schedule
from common.training import plan as run_plan

log = logging.getLogger("ft")


def baseline_samples(cfg: Any, plan: run_plan.Plan, model: Any, tok: Any, rows: list[dict], out: Any) -> None:
    """Base-model answers on the first val examples, written before training (the flan-t5 reference does this)."""
    rows = rows[: cfg.eval.baseline_samples]
    ids = [arch.get(cfg).encode_prompt(cfg, tok, r) for r in rows]
    answers = modeling.generate(model, tok, ids, cfg.eval.max_new_tokens, arch.get(cfg), cfg.eval.batch_size,
                                "baseline samples", plan.precision)
    io.write_jsonl(out / "baseline_samples.jsonl", [
        {"id": r["id"], "prompt": prompts.prompt_text(r), "target": prompts.reference(r), "base_answer": a}
        for r, a in zip(rows, answers)])


def body(ctx: run.Context) -> None:
    import torch
    from transformers import set_seed

    cfg, rp = ctx.cfg, ctx.paths
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    set_seed(cfg.train.seed)
    plan = run_plan.resolve(cfg)
    dist.start(plan.device)  # several processes (make train NPROC=N): the process group, before any model loads
    if dist.world() > 1:
        log.info("engine %s, world size %d: each process trains on 1/%d of the effective batch", dist.engine(),
                 dist.world(), dist.world())
    capacity = batching.cap_memory(cfg, plan)
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    train_rows, val_rows = io.read_jsonl(rp.split("train")), io.read_jsonl(rp.split("val"))
    train_ds = builder.encode_split(cfg, tok, train_rows, "train")
    val_ds = builder.encode_split(cfg, tok, val_rows, "val")
    n_tokens = sum(lengths := [len(x) for x in train_ds["input_ids"]])
    n_answer = sum(sum(1 for y in x if y != -100) for x in train_ds["labels"])
    log.info("train: %d examples, %d tokens (%d answer tokens trained); val: %d examples", len(train_ds), n_tokens,
             n_answer, len(val_ds))
    plan.schedule = schedule.schedule(cfg, len(train_ds), len(val_ds) > 0)

    model = builder.load_for_training(cfg, plan, source)
    plan.family = getattr(model.config, "model_type", None) or type(model).__name__  # any causal model PEFT can tune
    if cfg.eval.baseline_samples and dist.is_main() and not (rp.out / "baseline_samples.jsonl").exists():
        baseline_samples(cfg, plan, model, tok, val_rows, rp.out)

    plan.batching = batching.choose(cfg, plan, model, train_ds, tok.pad_token_id, capacity, dist.world())
    predicted = footprint.predict_run(cfg, plan, lengths, n_answer / max(n_tokens, 1), capacity)  # make plan's peak
    report_to = builder.trackers(cfg, plan, rp.tensorboard)  # may add a note: before the plan is logged
    log.info("%s", plan.table())
    key = checkpoint_key(cfg, rp, train_ds, val_ds)
    last = resumable_checkpoint(cfg, rp, key) if dist.is_main() else None  # before the trainer creates the folder
    dist.barrier()  # rank 0 has removed stale or incomplete checkpoints: the others read the same last one
    if not dist.is_main():
        last = resumable_checkpoint(cfg, rp, key, clean=False)
    trainer = builder.make_trainer(cfg, plan, model, tok, train_ds, val_ds, str(rp.checkpoints), plan.schedule,
                                    report_to, plan.batching)
    result, seconds, clock = history.train(trainer, last)  # train time summed over resumed segments
    tokens = dist.total(trainer.trained_tokens)  # every process's micro-batches (each calls it)
    dist.barrier()
    if not dist.is_main():  # rank 0 writes every artifact
        return
    logged = trainer.state.log_history
    history.write_history(logged, rp.out)
    evals = [h["eval_loss"] for h in logged if "eval_loss" in h]
    ran = trainer.state.global_step - (int(Path(last).name.rsplit("-", 1)[-1]) if last else 0)
    info = metadata.describe(cfg, "train", plan=plan.describe(),
                        distributed={"engine": dist.engine(), "world_size": dist.world()}, resumed_from=last, train_seconds=round(seconds, 1),  # every segment's, to the resumed checkpoint
                        steps_this_process=ran,
                        step_seconds=round(clock.seconds, 3),  # the training steps alone: no evaluations or saves
                        trained_tokens=tokens, train_tokens_per_second=round(tokens / clock.seconds, 1)
                        if clock.steps and clock.seconds else None,  # non-padding tokens / time in training steps
                        global_step=trainer.state.global_step, train_loss=result.training_loss if ran else None,
                        final_eval_loss=evals[-1] if evals else None, best_eval_loss=min(evals) if evals else None,
                        best_checkpoint=trainer.state.best_model_checkpoint,
                        train_examples=len(train_ds), train_tokens=n_tokens, answer_tokens=n_answer,
                        peak_rss_mb=metadata.peak_rss_mb(), peak_gpu_mb=metadata.peak_gpu_mb(),
                        peak_gpu_reserved_mb=metadata.peak_gpu_reserved_mb(), hardware=metadata.hardware())
    info.update(footprint.check(info, predicted))  # predicted_peak_gb, measured_peak_gb; a warning over 1.25x
    with io.atomic_dir(rp.adapter) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))  # the whole log history, with the adapter
        io.atomic_write_json(tmp / "run_info.json", info)
    if os.environ.get("SM_MODEL_DIR"):  # SageMaker uploads whatever lands here as the model artifact
        shutil.copytree(rp.adapter, os.environ["SM_MODEL_DIR"], dirs_exist_ok=True)
        log.info("copied the adapter to SM_MODEL_DIR=%s", os.environ["SM_MODEL_DIR"])
    log.info("trained %d steps in %.0fs (train loss %.4f, eval loss %s) -> %s", trainer.state.global_step, seconds,
             result.training_loss, evals[-1] if evals else "n/a", rp.adapter)


def checkpoint_key(cfg: Any, rp: Any, *encoded: Any) -> str:
    """What an interrupted run's checkpoints must match to be resumed: every setting that defines the trained
    result (train's and prepare's stamps, runtime left out), the processed splits, and the encoded splits'
    tokens and labels (builder.fingerprint: a changed chat template or tokenizer changes them, the splits do
    not: they hold messages)."""
    settings = {k: v for step in ("prepare", "train") for k, v in stamps.step_settings(cfg, step).items()
                if k != "eval.baseline_samples"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for split in ("train", "val"):
        h.update(rp.split(split).read_bytes())
    h.update(builder.fingerprint(*encoded).encode())
    return h.hexdigest()


def resumable_checkpoint(cfg: Any, rp: Any, key: str, clean: bool = True) -> str | None:
    """The last checkpoint of an interrupted run with the same checkpoint_key; stale ones are removed (clean; in
    a multi-process run rank 0 cleans, the others only read). A checkpoint at or past its schedule's end is never
    resumed (resuming it trains 0 steps): the run starts fresh. A checkpoint holds the whole training state, so it
    resumes with any process count."""
    from transformers.trainer_utils import get_last_checkpoint

    if not clean:
        return get_last_checkpoint(str(rp.checkpoints)) if rp.checkpoints.is_dir() else None
    marker = rp.checkpoints / "settings.sha256"
    if rp.checkpoints.is_dir() and (not marker.exists() or marker.read_text() != key):
        log.info("training settings or data changed since the last checkpoints: starting fresh")
        shutil.rmtree(rp.checkpoints)
    rp.checkpoints.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(marker, key)
    while (last := get_last_checkpoint(str(rp.checkpoints))) is not None:
        try:  # the trainer writes trainer_state.json last: without it the save was cut short
            state = json.loads((Path(last) / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("removing %s: incomplete (the run was killed while saving it)", last)
            shutil.rmtree(last)
            continue
        end = state.get("max_steps") or 0
        if end > 0 and state.get("global_step", 0) >= end:
            log.info("%s is at the end of its schedule (step %d of %d): starting fresh", last, state["global_step"],
                     end)
            shutil.rmtree(rp.checkpoints)
            rp.checkpoints.mkdir(parents=True)
            io.atomic_write_text(marker, key)
            return None
        return last
    return None


def main(argv: list[str] | None = None) -> int:
    return run.main("train", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
