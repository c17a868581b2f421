"""What training leaves to read: progress with an ETA, train time summed over resumed runs, train_log.csv, loss.png."""
from __future__ import annotations

import csv
import json
import logging
import time
from io import StringIO
from pathlib import Path
from typing import Any

from common.core.io import atomic_write_text
from common.model import dtypes

log = logging.getLogger("ft")


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
            if dtypes.cuda():
                import torch

                torch.cuda.synchronize()  # the step's queued kernels belong to the step
            self.seconds += time.perf_counter() - self._t
            self.steps += 1

    return StepClock()


TRAIN_SECONDS = "train_seconds.json"  # in each checkpoint: the train time up to its save, earlier segments included


def seconds_before(checkpoint: str | Path | None) -> float:
    """The train time an interrupted run had spent up to `checkpoint` (0 without one, or from a checkpoint saved
    before this file was written, said in the log)."""
    if not checkpoint:
        return 0.0
    f = Path(checkpoint) / TRAIN_SECONDS
    try:
        return float(json.loads(f.read_text())["train_seconds"])
    except (OSError, ValueError, KeyError):
        log.warning("%s has no %s: the earlier segments' train time is not counted", checkpoint, TRAIN_SECONDS)
        return 0.0


def train_clock(before: float) -> Any:
    """A callback timing this training process (`seconds()`: `before`, the resumed checkpoint's total, plus this
    segment) that writes the running total into each checkpoint it saves, so a run killed and resumed, however
    many times, reports the time of every segment up to the checkpoint it went on from."""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.time()

        def seconds(self) -> float:
            return before + time.time() - self.t0

        def on_save(self, args, state, control, **kw):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / TRAIN_SECONDS).write_text(json.dumps({"train_seconds": round(self.seconds(), 3)}))

    return TrainClock()


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


def train(trainer: Any, last: str | None) -> tuple[Any, float, Any]:
    """Run `trainer` (resumed from checkpoint `last`, or fresh) with the log, step and train clocks: (its result,
    train seconds summed over every resumed segment, the step clock: time in training steps alone)."""
    trainer.add_callback(log_callback())
    clock = step_clock()
    trainer.add_callback(clock)
    if last:
        log.info("resuming from %s (an earlier run was interrupted)", last)
    timer = train_clock(seconds_before(last))
    trainer.add_callback(timer)
    result = trainer.train(resume_from_checkpoint=last)
    return result, timer.seconds(), clock


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
