"""Micro-batches sized to the machine (runtime.micro_batch) and a cap on GPU memory (runtime.gpu_memory_gb).

The recipe's batch_size x grad_accum is the effective batch: what the optimisation depends on, kept as the
reference setups chose it. How it is split into forward passes is a speed decision only: the loss is normalised
over the labelled tokens of the whole effective batch (common/training/loss.py), and the sampler groups examples by
effective batch, so 2 x 8 and 16 x 1 see the same examples per step and give the same loss curve (tests/
test_training.py checks it on the CPU). The reference splits were chosen for a 16 GB T4; on an H100 they leave
the GPU idle (Mistral-7B QLoRA: 786 tok/s at 2 x 8, 4,766 at 16 x 1).

runtime.micro_batch: auto picks, on a GPU, the largest divisor of the effective batch whose forward + backward on
the *longest* examples of the training split fits in HEADROOM of the GPU's memory (or of runtime.gpu_memory_gb)
less RESERVE_GB, optimizer states included; probed with the real model, loss and precision before the trainer
starts. On a CPU auto keeps the recipe's batch_size (measured there: larger micro-batches do not pay on 2 cores). A number is used as
given (it must divide the effective batch). The choice and the probes go to the log and run_info.json (plan.batching).
"""
from __future__ import annotations

import gc
import itertools
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from common.core.io import UserError

log = logging.getLogger("ft")

# Share of the GPU's memory (or of the cap) a probed step may take, optimizer states included, less a fixed
# reserve. The rest covers the optimizer step's temporaries, cuBLAS workspaces and allocator fragmentation (the
# probe already uses the longest examples). Measured on an H100 at real shapes: under a 24 GB cap Mistral-7B and
# Llama-3-8B QLoRA peaked at 14.8 and 16.9 GB reserved, TinyLlama at a 16 GB cap at 13.2 GB.
HEADROOM = 0.8
RESERVE_GB = 0.5


@dataclass
class Batching:
    effective: int
    micro_batch: int
    grad_accum: int
    why: str
    gpu_memory_gb: float | None = None  # what the split was sized against: runtime.gpu_memory_gb, else the GPU's total
    probes: list[dict] = field(default_factory=list)
    processes: int = 1  # micro_batch x grad_accum x processes = effective

    def describe(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        procs = f" x {self.processes} processes" if self.processes > 1 else ""
        return (f"micro-batch {self.micro_batch} x grad_accum {self.grad_accum}{procs} = effective batch "
                f"{self.effective} ({self.why})")


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def cap_memory(cfg: Any, plan: Any) -> float | None:
    """Apply runtime.gpu_memory_gb to this process (PyTorch's allocator then refuses more, as a smaller GPU would);
    returns the usable GPU memory in GB (None on a CPU)."""
    if plan.device != "cuda":
        return None
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    cap = cfg.runtime.gpu_memory_gb
    if cap is None:
        return total
    if cap < total:
        torch.cuda.set_per_process_memory_fraction(cap / total, 0)
        log.info("GPU memory capped at %.1f GB of %.1f GB (runtime.gpu_memory_gb)", cap, total)
    return min(cap, total)


def collate(ds: Any, idx: list[int], pad_id: int, padding_free: bool, device: str) -> dict:
    """The batch the trainer's collator would build from these examples: right-padded rows with an attention mask,
    or (padding_free) one row of the concatenated examples with position_ids and the examples' boundaries."""
    import torch

    ids = [ds[i]["input_ids"] for i in idx]
    labels = [ds[i]["labels"] for i in idx]
    if padding_free:
        pos = [list(range(len(x))) for x in ids]
        cu = torch.tensor([0, *itertools.accumulate(len(x) for x in ids)], dtype=torch.int32, device=device)
        longest = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([list(itertools.chain.from_iterable(ids))], device=device),
                "labels": torch.tensor([list(itertools.chain.from_iterable(labels))], device=device),
                "position_ids": torch.tensor([list(itertools.chain.from_iterable(pos))], device=device),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    width = max(len(x) for x in ids)
    label_width = max(len(x) for x in labels)
    return {"input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device),
            "labels": torch.tensor([x + [-100] * (label_width - len(x)) for x in labels], device=device)}


def probe_step(model: Any, plan: Any, batch: dict, answer_only: bool) -> None:
    """One forward + backward as training runs it (same loss path, autocast and trainable weights)."""
    from common.training import loss

    with loss.autocast(plan):
        if answer_only:
            total, n = loss.answer_loss(model, batch, plan.liger)
            loss = total / n.clamp(min=1)
        else:
            loss = model(**batch).loss
    loss.backward()


def optimizer_bytes(model: Any, optim: str) -> int:
    """Memory the optimizer will add at its first step: AdamW keeps two fp32 states per trainable weight (8-bit
    optimizers one byte each)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n * (2 if "8bit" in optim else 8)


def choose(cfg: Any, plan: Any, model: Any, ds: Any, pad_id: int, capacity_gb: float | None,
           processes: int = 1) -> Batching:
    """The split of the effective batch for this process; with several processes (make train NPROC=N) each takes
    1/N of it, so the accumulation is divided and the effective batch stays the recipe's."""
    t = cfg.train
    total = t.batch_size * t.grad_accum
    if total % processes:
        raise UserError(f"the effective batch train.batch_size x train.grad_accum = {total} does not split over "
                        f"{processes} processes; use a process count that divides {total}")
    eff = total // processes  # this process's share
    share = f", {processes} processes" if processes > 1 else ""
    r = cfg.runtime
    if r.micro_batch != "auto":
        m = int(r.micro_batch)
        if eff % m:
            raise UserError(f"runtime.micro_batch={m} does not divide this process's share {eff} of the effective batch "
                            f"{total} ({processes} processes); choose a divisor of {eff} or auto")
        return Batching(total, m, eff // m, f"runtime.micro_batch={m}{share}", capacity_gb, processes=processes)
    if plan.device != "cuda" or capacity_gb is None:
        m = max(d for d in divisors_desc(eff) if d <= t.batch_size)
        return Batching(total, m, eff // m, f"auto on a CPU: the recipe's batch_size{share}", processes=processes)
    import torch

    from common.training import loss

    loss.align_dtypes(model, plan)  # fp32 trainable weights, as the trainer will have them
    budget = (HEADROOM * capacity_gb - RESERVE_GB) * 2 ** 30
    extra = optimizer_bytes(model, plan.optim)
    order = sorted(range(len(ds)), key=lambda i: -len(ds[i]["input_ids"]))
    answer_only = bool(r.answer_only_logits)
    was_training = model.training
    model.train()

    def measure(m: int) -> dict:
        idx = [order[i % len(order)] for i in range(m)]  # the m longest (repeated when the split is smaller)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        oom = False
        try:
            probe_step(model, plan, collate(ds, idx, pad_id, plan.padding_free, "cuda"), answer_only)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            oom = True
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated()
        need = peak + extra
        fits = not oom and need <= budget
        log.info("micro-batch probe: %d longest examples -> %s", m,
                 "out of memory" if oom else f"{need / 2 ** 30:.2f} GB with optimizer states "
                                             f"({'fits' if fits else 'over'} {budget / 2 ** 30:.1f} GB)")
        return {"micro_batch": m, "tokens": sum(len(ds[i]["input_ids"]) for i in idx),
                "peak_gb": None if oom else round(peak / 2 ** 30, 2),
                "with_optimizer_gb": None if oom else round(need / 2 ** 30, 2),
                "fits": fits, **({"error": "out of memory"} if oom else {})}

    start = planned_start(cfg, plan, ds, eff, capacity_gb) if r.probe_from_plan else None
    chosen, probes = search(divisors_desc(eff), measure, start)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model.train(was_training)
    where = f"{HEADROOM:.0%} of {capacity_gb:.1f} GB less {RESERVE_GB} GB" + (
        " (runtime.gpu_memory_gb)" if r.gpu_memory_gb else "") + (f", probed from make plan's {start}" if start else "")
    chosen = agree(chosen or 1)  # every process takes the smallest any of them found
    if not any(p["fits"] for p in probes):
        log.warning("even a micro-batch of 1 does not fit in %s; training will try it", where)
        return Batching(total, 1, eff, f"auto: nothing fits {where}; trying 1{share}", capacity_gb, probes, processes)
    why = f"auto: the largest divisor of {eff} whose longest batch fits {where}{share}"
    return Batching(total, chosen, eff // chosen, why, capacity_gb, probes, processes)


def search(sizes: list[int], measure: Any, start: int | None = None) -> tuple[int | None, list[dict]]:
    """The largest of `sizes` (descending) whose probe fits, and every probe made. From the top down by default; from
    `start` (make plan's micro-batch, runtime.probe_from_plan) up while larger ones fit, else down from it."""
    probes: list[dict] = []

    def fits(m: int) -> bool:
        probes.append(measure(m))
        return probes[-1]["fits"]

    if start not in sizes:
        return next((m for m in sizes if fits(m)), None), probes
    k = sizes.index(start)
    if not fits(start):
        return next((m for m in sizes[k + 1:] if fits(m)), None), probes
    best = start
    for m in reversed(sizes[:k]):  # the next larger ones, while they fit
        if not fits(m):
            break
        best = m
    return best, probes


def planned_start(cfg: Any, plan: Any, ds: Any, eff: int, capacity_gb: float) -> int | None:
    """make plan's micro-batch for this run: the largest divisor of `eff` whose predicted peak on the run's own
    lengths fits `capacity_gb` (None when the planner has no prediction)."""
    from common.training import fit

    return fit.planned_micro_batch(cfg, plan, [len(x) for x in ds["input_ids"]], eff, capacity_gb)


def agree(m: int) -> int:
    """The smallest of the processes' choices (one process: m itself)."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return m
    x = torch.tensor([m], device="cuda" if torch.cuda.is_available() else "cpu")
    td.all_reduce(x, op=td.ReduceOp.MIN)
    return int(x.item())
