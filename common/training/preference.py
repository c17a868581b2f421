"""Preference tuning on pairs (task preference): the TRL trainer of train.method, its reference, and its log names.

    dpo    TRL DPOTrainer, loss_type ["sigmoid"]       reference: the starting model (LoRA adapter disabled)
    ipo    TRL DPOTrainer, loss_type ["ipo"]           reference: the same
    orpo   trl.experimental ORPOTrainer                reference-free (odds ratio + NLL on the chosen side)
    simpo  trl.experimental CPOTrainer, loss "simpo"   reference-free (length-normalised, margin train.simpo_gamma;
           cpo_alpha = train.sft_weight)                SimPO's paper uses beta 2-2.5, not DPO's 0.1)

train.sft_weight adds the chosen answer's NLL (end-of-turn included) at that weight to dpo/ipo (TRL's "sft" loss, as
RPO and Llama 3 do) and simpo: without it both answers' likelihoods fall, and the tuned model may stop stopping.

Pairs are encoded here with the project's chat encoding (common/data/prompts.py encode_chat: the prompt tokens
generation starts from, each answer up to and including its end-of-turn token, BOS as llama.cpp applies it), the
same tokens SFT trains and eval scores; TRL's own tokenization is bypassed. The policy is the LoRA model the SFT
step builds (common/training/builder.py); DPO's reference is that model with its adapter disabled: the base model,
which is the model this step starts from. TRL's dropout switch-off (disable_dropout) is kept: policy and reference
log-probs then agree at step 0.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from common.core.io import UserError
from common.data import prompts
from common.training import builder, loss, schedule

log = logging.getLogger("ft")

METHODS = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
# The four reward columns train_log.csv keeps, whatever the trainer logs them as (eval_ variants likewise).
REWARD_COLUMNS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
LOG_NAMES: dict[str, dict[str, str]] = {m: {c: c for c in REWARD_COLUMNS} for m in METHODS}  # TRL 1.16: same names


def method(cfg: Any) -> str:
    """train.method, checked (the task's schema checks it too; a recipe loaded without it fails here in one line)."""
    m = cfg.train.get("method")
    if m not in METHODS:
        raise UserError(f"{cfg.recipe_file}: train.method must be one of {', '.join(METHODS)}, got {m!r}")
    if m == "orpo" and cfg.train.get("sft_weight"):
        raise UserError(f"{cfg.recipe_file}: train.sft_weight does not apply to orpo (its likelihood term is built in, "
                        "weighted against train.beta); set it to 0")
    return m


def reference(cfg: Any) -> str:
    """What the trainer compares the policy with, as the run plan and run_info.json say it."""
    m = method(cfg)
    if m in REFERENCE_FREE:
        return f"none ({m} is reference-free)"
    return "base model (adapter disabled)" + (", log-probs precomputed" if cfg.train.precompute_ref else "")


def describe(cfg: Any, pairs: int) -> dict:
    """run_info.json's `preference` block."""
    t = cfg.train
    return {"method": method(cfg), "beta": t.beta, "simpo_gamma": t.simpo_gamma if t.method == "simpo" else None,
            "precompute_ref": bool(t.precompute_ref) if t.method in ("dpo", "ipo") else None,
            "sft_weight": t.sft_weight if t.method != "orpo" else None,
            "reference": reference(cfg), "starting_model": cfg.model.name_or_path, "pairs": pairs}


# --------------------------------------------------------------------------- data
def encode_pair(cfg: Any, tok: Any, row: dict) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt ids, chosen ids, rejected ids) of a processed pair within train.max_length; None when either side
    keeps no answer token."""
    c = prompts.encode_chat(tok, row["prompt"], row["chosen"], cfg.train.max_length)
    r = prompts.encode_chat(tok, row["prompt"], row["rejected"], cfg.train.max_length)
    if c is None or r is None:
        return None
    n = next(i for i, x in enumerate(c[1]) if x != prompts.IGNORE)
    if r[0][:n] != c[0][:n] or r[1][n] == prompts.IGNORE:  # the prompt is rendered alone: same tokens either side
        raise ValueError(f"pair {row.get('id')}: the prompt encodes differently before its chosen and rejected answers")
    return c[0][:n], c[0][n:], r[0][n:]


def encode_pairs(cfg: Any, tok: Any, rows: list[dict], name: str) -> Any:
    """The pairs as a dataset (prompt_ids, chosen_ids, rejected_ids, length); pairs without an answer token on
    either side within train.max_length are dropped with a warning."""
    from datasets import Dataset

    enc = [e for e in (encode_pair(cfg, tok, r) for r in rows) if e]
    if len(enc) < len(rows):
        log.warning("%s: %d of %d pairs dropped (no answer token left within train.max_length=%d)", name,
                    len(rows) - len(enc), len(rows), cfg.train.max_length)
    if rows and not enc:
        raise UserError(f"every {name} pair is longer than train.max_length={cfg.train.max_length}; raise it")
    cols = {"prompt_ids": [e[0] for e in enc], "chosen_ids": [e[1] for e in enc], "rejected_ids": [e[2] for e in enc]}
    cols["length"] = [len(p) + max(len(c), len(r)) for p, c, r in enc]  # what group_by_length sorts on
    return Dataset.from_dict(cols)


def lengths(ds: Any) -> list[int]:
    """Every sequence a pair puts through the model: prompt + chosen, then prompt + rejected."""
    return [len(p) + len(s) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]) for s in (c, r)]


def probe_rows(ds: Any) -> Any:
    """Each pair as one row of both its sequences (input_ids, labels), for batching's GPU probe until it knows pairs."""
    from datasets import Dataset

    ig = prompts.IGNORE
    rows = list(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    return Dataset.from_dict({"input_ids": [p + c + p + r for p, c, r in rows],
                              "labels": [[ig] * len(p) + c + [ig] * len(p) + r for p, c, r in rows]})


def fingerprint(*splits: Any) -> str:
    """A hash of the encoded pairs (what training reads, whatever rendered it)."""
    h = hashlib.sha256()
    for ds in splits:
        for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for row in ds[col]:
                h.update(len(row).to_bytes(4, "little") + b"".join(x.to_bytes(4, "little", signed=True) for x in row))
    return h.hexdigest()


def sided(ds: Any) -> Any:
    """The pairs as CPO/ORPO read them: prompt, prompt + chosen and prompt + rejected rows with labels."""
    def row(ex: dict) -> dict:
        p, out = ex["prompt_ids"], {"prompt_input_ids": ex["prompt_ids"], "prompt_attention_mask": [1] * len(ex["prompt_ids"])}
        for side in ("chosen", "rejected"):
            a = ex[f"{side}_ids"]
            out |= {f"{side}_input_ids": p + a, f"{side}_attention_mask": [1] * (len(p) + len(a)),
                    f"{side}_labels": [prompts.IGNORE] * len(p) + a}
        return out

    return ds.map(row, remove_columns=["prompt_ids", "chosen_ids", "rejected_ids"])


# --------------------------------------------------------------------------- trainer
def trainer_class(base: type, plan: Any) -> type:
    """`base` with the plan's autocast around the loss, the non-padding tokens of every training micro-batch counted
    (run_info's tokens/s: both sides of each pair) and pairs taken as encoded here (no TRL re-tokenization)."""

    class Trainer(base):
        trained_tokens: Any = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # DPOTrainer
            return dataset

        def tokenize_row(self, feature, model=None):  # CPOTrainer, ORPOTrainer: rows come as sided() made them
            return {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                masks = [inputs[k] for k in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
                         if k in inputs]
                self.trained_tokens = self.trained_tokens + sum(m.sum() for m in masks)
            with loss.autocast(plan):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    Trainer.__name__ = Trainer.__qualname__ = f"Pairs{base.__name__}"
    return Trainer


def make_trainer(cfg: Any, plan: Any, model: Any, tok: Any, train_ds: Any, val_ds: Any, out: str,
                 sched: schedule.Schedule | None = None, report_to: list[str] | None = None, batching: Any = None) -> Any:
    """The TRL trainer of train.method on the LoRA model `model` and the encoded pairs (encode_pairs)."""
    m, t = method(cfg), cfg.train
    args = builder.training_args(cfg, plan, out, len(val_ds) > 0, sched, report_to, batching)
    args.update(max_length=t.max_length, beta=t.beta, disable_dropout=True)
    val = val_ds if len(val_ds) else None
    if m in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        sft = ["sft"] if t.sft_weight else []  # RPO / Llama 3's NLL term on the chosen answer, end of turn included
        conf = DPOConfig(**args, loss_type=["sigmoid" if m == "dpo" else "ipo", *sft],
                         loss_weights=[1.0, t.sft_weight] if sft else None, precompute_ref_log_probs=bool(t.precompute_ref))
        cls = trainer_class(DPOTrainer, plan)
    elif m == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        conf, cls = ORPOConfig(**args), trainer_class(ORPOTrainer, plan)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        conf = CPOConfig(**args, loss_type="simpo", cpo_alpha=t.sft_weight, simpo_gamma=t.simpo_gamma)
        cls = trainer_class(CPOTrainer, plan)
    if m in REFERENCE_FREE:
        train_ds, val = sided(train_ds), None if val is None else sided(val)
    kw: dict[str, Any] = {}
    if m not in REFERENCE_FREE:
        # DPOTrainer's reference for a LoRA it attaches itself is the model with that adapter disabled: the starting
        # model. Handed a model that already has an adapter, it would copy that adapter as the reference instead,
        # so the LoRA is taken off (the base keeps its loading, quantization and checkpointing) and given back as
        # a config.
        model, kw["peft_config"] = model.unload(), builder.lora_config(cfg)
    trainer = cls(model=model, args=conf, train_dataset=train_ds, eval_dataset=val, processing_class=tok, **kw)
    loss.align_dtypes(trainer.model, plan)  # TRL casts a quantized model's trainable weights to bf16
    return trainer


def reward_logs(history: list[dict], m: str) -> list[dict]:
    """The trainer's log history with its reward names mapped to REWARD_COLUMNS (eval_ prefixed ones too)."""
    names = {**LOG_NAMES[m], **{f"eval_{k}": f"eval_{v}" for k, v in LOG_NAMES[m].items()}}
    return [{names.get(k, k): v for k, v in h.items()} for h in history]
