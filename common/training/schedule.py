"""How long to train: the recipe's steps fitted to the data (the epoch cap) and whether to keep the best checkpoint."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ft")


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
            # a pass is ceil(n / per_step) steps: the trainer's epochs end on a short last batch (with any split
            # into micro-batches, accumulation or processes), so cap passes take cap x that many steps; the trainer
            # evaluates and saves at the last step too (transformers' DefaultFlowCallback), so the last weights
            # compete for the best checkpoint without rounding the steps down to an evaluation interval
            steps = max(1, math.ceil(cap * math.ceil(n_train / per_step)))
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
