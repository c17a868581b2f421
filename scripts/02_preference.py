"""Tune the recipe's base model on preference pairs with LoRA: DPO, IPO, ORPO or SimPO (task preference).

    make train RECIPE=smollm2-dpo      # or: python scripts/02_preference.py --recipe smollm2-dpo [--set train.beta=0.2]

train.method picks the loss (common/training/preference.py): dpo and ipo through TRL's DPOTrainer against a
reference, orpo and simpo through trl.experimental's ORPO and CPO trainers, reference-free. The reference is the
model this step starts from: the base model, i.e. the trained model with its LoRA adapter disabled (no second copy
in memory); train.precompute_ref computes its log-probs once before training. The pairs are the processed splits
(prompt, chosen, rejected as messages), encoded with the same chat encoding as SFT and eval.

The run plan (common/training/plan.py), batching, memory prediction, resuming from the last checkpoint and the train
time summed over resumed segments are as in scripts/02_sft_qlora.py. Tokens per second count the non-padding tokens
of both sides of every training pair over the time spent in training steps.

Writes outputs/<run>/: checkpoints/, train_log.csv (with rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies), loss.png, and, last and atomically, adapter/ (LoRA weights, tokenizer with its chat template,
trainer_state.json, run_info.json with a `preference` block: method, beta, reference, starting model, pairs).
Merge, eval and export read it as they read an SFT adapter.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
from pathlib import Path

from common.core import dist, io, metadata, run, stamps
from common.model import modeling
from common.training import batching, builder, footprint, history, preference, schedule
from common.training import plan as run_plan

log = logging.getLogger("ft")
sft = importlib.import_module("scripts.02_sft_qlora")  # resumable_checkpoint: the same checkpoint rules


def body(ctx: run.Context) -> None:
    import torch
    from transformers import set_seed

    cfg, rp = ctx.cfg, ctx.paths
    method = preference.method(cfg)  # before anything loads: a wrong method is one line
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    set_seed(cfg.train.seed)
    plan = run_plan.resolve(cfg)
    if cfg.lora.dropout:
        plan.note(f"lora.dropout {cfg.lora.dropout:g} -> 0: preference training turns dropout off (TRL's disable_dropout"
                  ", so the policy and its reference agree)")
    dist.start(plan.device)
    capacity = batching.cap_memory(cfg, plan)
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    train_ds = preference.encode_pairs(cfg, tok, io.read_jsonl(rp.split("train")), "train")
    val_ds = preference.encode_pairs(cfg, tok, io.read_jsonl(rp.split("val")), "val")
    lengths = preference.lengths(train_ds)  # two sequences a pair: prompt + chosen, prompt + rejected
    n_tokens = sum(lengths)
    n_answer = sum(len(x) for col in ("chosen_ids", "rejected_ids") for x in train_ds[col])
    log.info("train: %d pairs, %d tokens (%d answer tokens); val: %d pairs; method %s, beta %g", len(train_ds),
             n_tokens, n_answer, len(val_ds), method, cfg.train.beta)
    plan.schedule = schedule.schedule(cfg, len(train_ds), len(val_ds) > 0)

    model = builder.load_for_training(cfg, plan, source)
    plan.family = getattr(model.config, "model_type", None) or type(model).__name__
    plan.reference = preference.reference(cfg)  # the run plan's loss row names it
    # a CPU keeps the recipe's split; a GPU probe runs each pair as one row of its two sequences (batching does
    # not yet know pairs nor the reference's no-grad forward)
    probe = preference.probe_rows(train_ds) if plan.device == "cuda" else train_ds
    plan.batching = batching.choose(cfg, plan, model, probe, tok.pad_token_id, capacity, dist.world())
    predicted = footprint.predict_run(cfg, plan, lengths, n_answer / max(n_tokens, 1), capacity)
    report_to = builder.trackers(cfg, plan, rp.tensorboard)
    log.info("%s", plan.table())
    key = checkpoint_key(cfg, rp, train_ds, val_ds)
    last = sft.resumable_checkpoint(cfg, rp, key) if dist.is_main() else None
    dist.barrier()
    if not dist.is_main():
        last = sft.resumable_checkpoint(cfg, rp, key, clean=False)
    trainer = preference.make_trainer(cfg, plan, model, tok, train_ds, val_ds, str(rp.checkpoints), plan.schedule,
                                      report_to, plan.batching)
    result, seconds, clock = history.train(trainer, last)  # train time summed over resumed segments
    tokens = dist.total(trainer.trained_tokens)
    dist.barrier()
    if not dist.is_main():
        return
    logged = preference.reward_logs(trainer.state.log_history, method)
    history.write_history(logged, rp.out)
    evals = [h["eval_loss"] for h in logged if "eval_loss" in h]
    ran = trainer.state.global_step - (int(Path(last).name.rsplit("-", 1)[-1]) if last else 0)
    last_rewards = next((h for h in reversed(logged) if "rewards/margins" in h), {})
    info = metadata.describe(
        cfg, "train", plan=plan.describe(), preference=preference.describe(cfg, len(train_ds)),
        distributed={"engine": dist.engine(), "world_size": dist.world()}, resumed_from=last,
        train_seconds=round(seconds, 1), steps_this_process=ran, step_seconds=round(clock.seconds, 3),
        trained_tokens=tokens, train_tokens_per_second=round(tokens / clock.seconds, 1)
        if clock.steps and clock.seconds else None,
        global_step=trainer.state.global_step, train_loss=result.training_loss if ran else None,
        final_rewards={k: last_rewards.get(k) for k in preference.REWARD_COLUMNS},
        final_eval_loss=evals[-1] if evals else None, best_eval_loss=min(evals) if evals else None,
        best_checkpoint=trainer.state.best_model_checkpoint,
        train_examples=len(train_ds), train_tokens=n_tokens, answer_tokens=n_answer,
        peak_rss_mb=metadata.peak_rss_mb(), peak_gpu_mb=metadata.peak_gpu_mb(),
        peak_gpu_reserved_mb=metadata.peak_gpu_reserved_mb(), hardware=metadata.hardware())
    info.update(footprint.check(info, predicted))
    with io.atomic_dir(rp.adapter) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        io.atomic_write_json(tmp / "run_info.json", info)
    log.info("trained %d steps in %.0fs (%s loss %.4f, eval loss %s, final margin %s) -> %s",
             trainer.state.global_step, seconds, method, result.training_loss, evals[-1] if evals else "n/a",
             last_rewards.get("rewards/margins", "n/a"), rp.adapter)


def checkpoint_key(cfg, rp, *encoded) -> str:
    """What an interrupted run's checkpoints must match to be resumed: train's and prepare's settings (runtime left
    out), the processed splits and the encoded pairs."""
    settings = {k: v for step in ("prepare", "train") for k, v in stamps.step_settings(cfg, step).items()
                if k != "eval.baseline_samples"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for split in ("train", "val"):
        h.update(rp.split(split).read_bytes())
    h.update(preference.fingerprint(*encoded).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    return run.main("train", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
