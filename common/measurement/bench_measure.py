"""How `make bench` measures one row in its own process: timed training steps (tokens, examples, peak memory), model FLOPs for MFU, the machine's matmul peak, and batched generation."""
from __future__ import annotations

import logging
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common.core import config, io, metadata, paths
from common.core.io import UserError
from common.measurement import bench_rows, profiling
from common.model import arch, modeling
from common.training import batching
from common.training import plan as run_plan

log = logging.getLogger("ft")


class PeakMemory:
    """Peak resident memory of this process, sampled every 20 ms (plus the kernel's own high-water mark)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.02):
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """The end time of every step."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            log.info("  step %d/%d", state.global_step, state.max_steps)

    return StepTimer()


def timed_steps(warmup: int, steps: int) -> list[int]:
    """The steps to time, as 0-based indices: step k lasts ends[k] - ends[k-1], so the first step, which has no start
    mark, is timed only after a warm-up."""
    return list(range(max(warmup, 1), warmup + steps))


def model_flops_per_token(model: Any) -> tuple[float, int, int]:
    """(FLOPs per token, frozen linear parameters, trainable parameters) for LoRA training."""
    import torch

    frozen = 0
    seen: set[int] = set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and w is not None and not w.requires_grad and id(w) not in seen:
            seen.add(id(w))  # a tied output layer counts once per use: it is the embedding's tensor
            frozen += w.numel() * (2 if getattr(w, "quant_state", None) is not None else 1)  # 4-bit packs 2/byte
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * frozen + 6.0 * trainable, frozen, trainable


def matmul_peak(device: str, budget_s: float = 0.5) -> dict[str, float]:
    """Best measured GFLOP/s of a square matmul, fp32 and bf16, on this machine now. Each size is timed for about
    `budget_s` (repetitions from a first timed run), and larger sizes are skipped once one multiply takes longer
    than the budget: on CPUs without bf16 instructions a bf16 matmul runs at ~1 GFLOP/s (measured on an AMD EPYC
    host), where a fixed repetition count would take minutes."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sizes = (512, 1024, 2048) if device == "cpu" else (4096, 8192)
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            a @ b  # warm-up
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            once = time.perf_counter() - t
            reps = max(1, int(budget_s / max(once, 1e-6)))
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
            if once > budget_s:
                break
        out[name] = round(best, 1)
    return out


def train_worker(cfg: config.Config, spec: dict, warmup: int, steps: int, profile: bool = False) -> dict:
    import torch
    from transformers import set_seed

    set_seed(cfg.train.seed)
    plan = run_plan.resolve(cfg)
    capacity = batching.cap_memory(cfg, plan)  # every row under the same cap (a smaller GPU refuses them all alike)
    rows = io.read_jsonl(paths.RunPaths(cfg.run).split("train"))
    need = (warmup + steps + profile) * cfg.train.batch_size * cfg.train.grad_accum
    if len(rows) < need:
        rows = (rows * (need // max(1, len(rows)) + 1))[:need] if rows else rows
    if not rows:
        raise UserError("the train split is empty; run make prepare")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        kind = spec["kind"]
        if kind == "ours":
            trainer = bench_rows.build_ours(cfg, plan, rows, tmp, capacity)
        elif kind == "reference":
            trainer = bench_rows.build_reference(cfg, plan, rows, tmp)
        else:
            trainer = bench_rows.build_trl(cfg, plan, rows, tmp, spec.get("bf16"))
        counts: list[tuple[int, int, int]] = []
        trainer.data_collator = bench_rows.counting(trainer.data_collator, counts)
        timer = step_timer()
        trainer.add_callback(timer)
        prof = None
        if profile:  # one more step after the timed ones, under torch.profiler (not timed)
            trace = paths.bench_dir() / f"{cfg.run}-traces" / f"{spec['name']}.json.gz"
            prof = profiling.one_step_profiler(warmup + steps + 1, trace)
            trainer.add_callback(prof)
        flops_per_token, frozen, trainable = model_flops_per_token(trainer.model)
        precision = ("bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32")
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            trainer.train()
    ends = timer.ends
    if len(ends) < warmup + steps:
        raise UserError(f"only {len(ends)} steps ran, {warmup + steps} needed; lower --steps/--warmup")
    per_step = trainer.args.gradient_accumulation_steps  # micro-batches per optimizer step
    effective = trainer.args.per_device_train_batch_size * per_step
    keep = timed_steps(warmup, steps)
    if not keep:
        raise UserError("nothing to time: without a warm-up step give --steps 2 or more")
    took = {k: ends[k] - ends[k - 1] for k in range(1, warmup + steps)}
    seconds, n = sum(took[k] for k in keep), len(keep)
    real, total, labelled = (sum(c[i] for k in keep for c in counts[k * per_step:(k + 1) * per_step])
                             for i in range(3))
    out = {
        "precision": precision, "quantization_bits": plan.quant_bits, "device": plan.device,
        "steps_timed": n, "seconds": round(seconds, 3), "s_per_step": round(seconds / n, 4),
        "step_seconds": [round(took[k], 3) for k in range(max(warmup, 1), warmup + steps)],
        "tokens_per_s": round(real / seconds, 2), "padded_tokens_per_s": round(total / seconds, 2),
        "examples_per_s": round(n * effective / seconds, 3),
        "micro_batch": trainer.args.per_device_train_batch_size, "grad_accum": per_step,
        "non_padding_tokens": real, "padded_tokens": total, "labelled_tokens": labelled,
        "padding_share": round(1 - real / total, 4) if total else 0.0,
        "flops_per_token": flops_per_token, "frozen_linear_params": frozen, "trainable_params": trainable,
        "peak_rss_mb": round(max(mem.peak / 2 ** 20, metadata.peak_rss_mb()), 1),
    }
    if plan.device == "cuda":
        out["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        out["peak_vram_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)  # what the GPU holds
    if prof is not None:
        if prof.result is None:
            raise UserError(f"the profiled step {warmup + steps + 1} did not run")
        out["profile"] = prof.result
    return out


def generation_worker(cfg: config.Config, samples: int) -> dict:
    plan_dtype = modeling.inference_dtype()
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    model = modeling.load_model(cfg, source, 0, plan_dtype)
    rows = io.read_jsonl(paths.RunPaths(cfg.run).split(cfg.eval.split))[:samples]
    if not rows:
        raise UserError(f"the {cfg.eval.split} split is empty; run make prepare")
    a = arch.get(cfg)
    ids = [a.encode_prompt(cfg, tok, r) for r in rows]
    new = cfg.eval.max_new_tokens
    modeling.generate(model, tok, ids[:2], 4, a, 2, "warm-up", plan_dtype)
    res = {}
    bs = modeling.eval_batch_size(model, ids, new, cfg.eval.batch_size)
    sizes = [("batched", bs), ("one_at_a_time", 1)]
    if bs != modeling.EVAL_CPU_BATCH:  # what a batch other than 8 (auto on a GPU, or the recipe's) pays over 8
        sizes.append(("batched_8", modeling.EVAL_CPU_BATCH))
    for name, bs in sizes:
        t = time.perf_counter()
        answers = modeling.generate(model, tok, ids, new, a, bs, f"generation {name}", plan_dtype)
        dt = time.perf_counter() - t
        out_tokens = sum(len(tok(a, add_special_tokens=False).input_ids) for a in answers)
        res[name] = {"batch_size": bs, "seconds": round(dt, 2), "samples_per_s": round(len(ids) / dt, 3),
                     "output_tokens_per_s": round(out_tokens / dt, 2), "answers": answers}
        log.info("generation %s (batch %d): %d prompts in %.1fs", name, bs, len(ids), dt)
    a, b = res["batched"].pop("answers"), res["one_at_a_time"].pop("answers")
    res.get("batched_8", {}).pop("answers", None)
    same = [x == y for x, y in zip(a, b)]
    return {"samples": len(ids), "max_new_tokens": new, "precision": plan_dtype, **res,
            "speedup": round(res["batched"]["samples_per_s"] / res["one_at_a_time"]["samples_per_s"], 2),
            "identical_outputs": sum(same), "differing": [
                {"index": i, "batched": x, "one_at_a_time": y} for i, (x, y, s) in enumerate(zip(a, b, same)) if not s]}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    m = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
         "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m
