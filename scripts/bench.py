"""Speed benchmark: this project's training step and evaluation generation against the usual ways, in one run.

    make bench                                     # the default recipe; prepares its data first if needed
    make bench RECIPE=smollm2-xauusd BENCH="--steps 8 --gen-samples 32"
    python scripts/bench.py --recipe smollm2 [--only ours,trl-defaults] [--steps 5] [--warmup 2] [--rounds 2]
    make bench RECIPE=tinyllama SHAPE=full BENCH="--profile --only ours,ours-compile"   # where a step's time goes

On the recipe's prepared train split and base model:

  training    ours               the recipe's own training step (common/training.py, as 02_sft_qlora runs it)
              ours-<change>      ours with one speed choice undone, to show what each one pays; on a GPU
                                 also the recipe's own micro-batch split, padded batches, Liger on/off,
                                 gradient checkpointing, eager attention, torch.compile of the decoder
                                 blocks (ours-compile) and a memory cap (ours-cap<N>gb)
              trl-defaults       plain TRL SFTTrainer with every default kept (bf16 autocast, gradient
                                 checkpointing, the model's own chat template) and the same LoRA settings
              trl-defaults-fp32  the same with bf16=False, so the precision matches ours
              reference          the reference setups' way: every example padded to 512 tokens, loss on all tokens
  generation  batched (eval.batch_size, length-sorted, left-padded, KV cache) against one prompt at a time,
              greedy, on the same test prompts; reports whether the outputs agree.

Each variant runs in its own process (a clean peak-memory figure): --warmup steps that are not timed, then
--steps timed steps. Reported: seconds/step, non-padding tokens/s, examples/s, peak memory (RSS; peak VRAM on
a GPU) and model FLOPs utilisation (MFU) against the matmul peak probed at the start of the same run (the
faster of fp32 and bf16, so a precision with a slow matmul does not look efficient). Model FLOPs per
non-padding token = 4 x frozen linear parameters (forward + activation-gradient backward) + 6 x LoRA
parameters; attention scores (about 1% at these lengths) and gradient-checkpointing recomputation are not
counted. A timed step in which torch.compile built a graph (runtime.compile: a new mask or shape variant) is left
out of its row and listed under the table. Run it on an otherwise idle machine: the load average at the start is
recorded.

--profile runs one more step per variant under torch.profiler (common/profiling.py): top-level ATen operators
issued, GPU kernels, the share of the step the GPU was busy, the top operators/kernels, and a trace per variant.

Writes outputs/bench/<run>.json (every figure, the machine, versions) and outputs/bench/<run>.md (the tables);
with --profile also outputs/bench/<run>-traces/<variant>.json.gz.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import arch, batching, config, io, loss, metadata, modeling, paths, profiling, prompts, run, training
from common import plan as run_plan
from common.io import UserError

log = logging.getLogger("ft")

REFERENCE_LENGTH = 512  # the reference setups pad (and truncate) every example to this many tokens
TARGETS = {"vs_trl": 2.0, "vs_reference": 3.0, "generation": 5.0, "peak_gb": 2.5}
# On a GPU: ours vs the faster plain-TRL row. The per-recipe GPU targets (tokens/s, peak under a memory cap) are
# the recipe's bench section.
GPU_VS_TRL = 2.5


# --------------------------------------------------------------------------- the variants
def variants(cfg: config.Config, plan: run_plan.Plan) -> dict[str, dict]:
    """name -> {kind, sets (recipe overrides), what}; the ablations undo one of the recipe's speed choices."""
    other = "bf16" if plan.precision == "fp32" else "fp32"
    out = {"ours": {"kind": "ours", "sets": [], "what": "this project, as the recipe configures it"},
           f"ours-{other}": {"kind": "ours", "sets": [f"train.precision={other}"],
                             "what": f"ours in {other}" + (" autocast" if other == "bf16" else "")}}
    if cfg.runtime.answer_only_logits and arch.get(cfg).chat_baselines:
        out["ours-full-logits"] = {"kind": "ours", "sets": ["runtime.answer_only_logits=false"],
                                   "what": "ours with full-vocabulary logits and TRL's per-step metrics"}
    if cfg.train.fast_dropout and plan.device == "cpu" and cfg.lora.dropout > 0:
        out["ours-torch-dropout"] = {"kind": "ours", "sets": ["train.fast_dropout=false"],
                                     "what": "ours with PEFT's own LoRA dropout (per-element Bernoulli draws)"}
    if not cfg.train.gradient_checkpointing:
        out["ours-grad-ckpt"] = {"kind": "ours", "sets": ["train.gradient_checkpointing=true"],
                                 "what": "ours with gradient checkpointing (less memory, more compute)"}
    if plan.device == "cuda":  # what each GPU choice pays (on a CPU auto keeps the recipe's split and padding)
        t, r = cfg.train, cfg.runtime
        if r.micro_batch == "auto":
            out["ours-recipe-split"] = {"kind": "ours", "sets": [f"runtime.micro_batch={t.batch_size}"],
                                        "what": f"ours at the recipe's micro-batch {t.batch_size} x {t.grad_accum}"}
        if plan.padding_free:
            out["ours-padded"] = {"kind": "ours", "sets": ["runtime.padding_free=false"],
                                  "what": "ours with padded micro-batches instead of padding-free rows"}
        if plan.varlen:
            out["ours-sdpa-mask"] = {"kind": "ours", "sets": ["runtime.varlen_attention=false"],
                                     "what": "ours with SDPA over the padding-free row's block-diagonal mask instead "
                                             "of the varlen kernel"}
        elif plan.padding_free and cfg.model.attn_implementation == "sdpa":
            out["ours-varlen"] = {"kind": "ours", "sets": ["runtime.varlen_attention=true"],
                                  "what": "ours with padding-free rows through PyTorch's varlen flash kernel"}
        if plan.liger:
            out["ours-no-liger"] = {"kind": "ours", "sets": ["runtime.liger=false"],
                                    "what": "ours without Liger's fused output layer + cross-entropy"}
        elif importlib.util.find_spec("liger_kernel") and r.answer_only_logits and arch.get(cfg).chat_baselines:
            out["ours-liger"] = {"kind": "ours", "sets": ["runtime.liger=true"],
                                 "what": "ours with Liger's fused output layer + cross-entropy"}
        if t.gradient_checkpointing:
            out["ours-no-grad-ckpt"] = {"kind": "ours", "sets": ["train.gradient_checkpointing=false"],
                                        "what": "ours without gradient checkpointing"}
        if cfg.model.attn_implementation == "sdpa":
            out["ours-eager-attn"] = {"kind": "ours", "sets": ["model.attn_implementation=eager"],
                                      "what": "ours with eager attention instead of SDPA"}
        if not r.compile:
            out["ours-compile"] = {"kind": "ours", "sets": ["runtime.compile=true"],
                                   "what": "ours with each decoder block torch.compile'd"}
        else:
            out["ours-no-compile"] = {"kind": "ours", "sets": ["runtime.compile=false"],
                                      "what": "ours without torch.compile of the decoder blocks"}
        if plan.quant_bits and plan.precision != "fp32":  # the other choice of quantization.upcast_frozen
            upcast = plan.frozen == "fp32"
            other, flip = (plan.precision, "false") if upcast else ("fp32", "true")
            out[f"ours-{other}-frozen"] = {"kind": "ours", "sets": [f"quantization.upcast_frozen={flip}"],
                                           "what": f"ours with the norms, embeddings and lm_head in {other} "
                                                   f"(quantization.upcast_frozen={flip})"}
        cap = cfg.bench.memory_cap_gb
        if cap and not r.gpu_memory_gb:
            out[f"ours-cap{cap}gb"] = {"kind": "ours", "sets": [f"runtime.gpu_memory_gb={cap}"],
                                       "what": f"ours with GPU memory capped at {cap} GB (a smaller GPU)"}
    if not arch.get(cfg).chat_baselines:  # plain TRL SFT and the padded reference are decoder-only setups
        return out
    out["trl-defaults"] = {"kind": "trl", "sets": [], "what": "plain TRL SFTTrainer, all defaults, same LoRA"}
    out["trl-defaults-fp32"] = {"kind": "trl", "sets": [], "bf16": False,
                                "what": "plain TRL SFTTrainer, all defaults but bf16=False"}
    out["reference"] = {"kind": "reference", "sets": [],
                        "what": f"padded to {REFERENCE_LENGTH} tokens, loss on every token (HF Trainer + PEFT)"}
    return out


# --------------------------------------------------------------------------- measuring
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


def counting(collate: Any, counts: list) -> Any:
    """Wrap a data collator to record (non-padding, total, labelled) tokens of every batch, in order."""
    def wrapped(features: list) -> Any:
        batch = collate(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())  # padding-free batches have no mask
        labels = batch.get("labels")
        counts.append((real, int(ids.numel()), int((labels != loss.IGNORE).sum()) if labels is not None else real))
        return batch

    return wrapped


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """The end time of every step, and how many graphs torch.compile had built by then (a step in which the
        count rose spent its time compiling)."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.graphs: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.graphs.append(compiled_graphs())
            log.info("  step %d/%d", state.global_step, state.max_steps)

    return StepTimer()


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed_steps(ends: list[float], graphs: list[int], warmup: int, steps: int) -> tuple[list[int], list[int]]:
    """(steps to time, timed steps left out because torch.compile built a graph in them), as 0-based step indices.
    Step k lasts ends[k] - ends[k-1]; the first step has no start mark, so it is timed only after a warm-up."""
    window = range(max(warmup, 1), warmup + steps)
    compiled = [k for k in window if graphs[k] > graphs[k - 1]]
    return [k for k in window if k not in compiled], compiled


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


# --------------------------------------------------------------------------- training workers
def build_ours(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str, capacity: float | None) -> Any:
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    ds = training.encode_split(cfg, tok, rows, "train")
    model = training.load_for_training(cfg, plan, source)
    split = batching.choose(cfg, plan, model, ds, tok.pad_token_id, capacity)
    log.info("%s", split.line())
    return training.make_trainer(cfg, plan, model, tok, ds, ds.select([]), out, batching=split)


def build_reference(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str) -> Any:
    """The reference setups' training, none of this project's speed choices: fixed-length padding, labels = every
    real token, the model's own loss, HF + PEFT as their notebooks load it (prepare_model_for_kbit_training when
    quantized, PEFT's own dropout), the recipe's precision through TrainingArguments only."""
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, default_data_collator

    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    pad = tok.pad_token_id
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        enc = prompts.encode_chat(tok, r["prompt"], r["completion"], REFERENCE_LENGTH)
        if not enc:
            continue
        ids = enc[0]
        fill = REFERENCE_LENGTH - len(ids)
        cols["input_ids"].append(ids + [pad] * fill)
        cols["attention_mask"].append([1] * len(ids) + [0] * fill)
        cols["labels"].append(ids + [loss.IGNORE] * fill)
    model = modeling.load_model(cfg, source, plan.quant_bits, "fp32")
    if plan.quant_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, training.lora_config(cfg))
    args = training.training_args(cfg, plan, out, has_val=False)
    args["train_sampling_strategy"] = "random"  # fixed-length batches: nothing to group
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Dataset.from_dict(cols),
                   data_collator=default_data_collator)


def build_trl(cfg: config.Config, plan: run_plan.Plan, rows: list[dict], out: str, bf16: bool | None) -> Any:
    """Plain TRL: the tokenizer's own chat template, a prompt/completion dataset, SFTConfig defaults."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    source = modeling.model_source(cfg)
    tok = AutoTokenizer.from_pretrained(source)
    if not tok.chat_template:  # a tokenizer without one: the recipe's template, as a TRL user would set it
        tok = modeling.load_tokenizer(cfg, source)
    model = modeling.load_model(cfg, source, plan.quant_bits, "fp32")
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    t = cfg.train
    kw: dict[str, Any] = dict(output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                              gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, seed=t.seed,
                              report_to="none", save_strategy="no", use_cpu=plan.device == "cpu")
    if bf16 is not None:
        kw["bf16"] = bf16
    return SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                      peft_config=training.lora_config(cfg))


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
            trainer = build_ours(cfg, plan, rows, tmp, capacity)
        elif kind == "reference":
            trainer = build_reference(cfg, plan, rows, tmp)
        else:
            trainer = build_trl(cfg, plan, rows, tmp, spec.get("bf16"))
        counts: list[tuple[int, int, int]] = []
        trainer.data_collator = counting(trainer.data_collator, counts)
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
    keep, compiled = timed_steps(ends, timer.graphs, warmup, steps)
    if not keep and not compiled:
        raise UserError("nothing to time: without a warm-up step give --steps 2 or more")
    if not keep:
        raise UserError("every timed step was compiling (torch.compile); raise --steps or --warmup")
    took = {k: ends[k] - ends[k - 1] for k in range(1, warmup + steps)}
    seconds, n = sum(took[k] for k in keep), len(keep)
    real, total, labelled = (sum(c[i] for k in keep for c in counts[k * per_step:(k + 1) * per_step])
                             for i in range(3))
    out = {
        "precision": precision, "quantization_bits": plan.quant_bits, "device": plan.device,
        "steps_timed": n, "seconds": round(seconds, 3), "s_per_step": round(seconds / n, 4),
        "step_seconds": [round(took[k], 3) for k in range(max(warmup, 1), warmup + steps)],
        "compile_steps_left_out": [{"step": k + 1, "seconds": round(took[k], 3)} for k in compiled],
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


# --------------------------------------------------------------------------- generation worker
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


# --------------------------------------------------------------------------- the parent
def worker_body(ctx: run.Context) -> None:
    a = ctx.args
    spec = json.loads(a.worker)
    try:
        if spec["kind"] == "generation":
            result = generation_worker(ctx.cfg, a.gen_samples)
        else:
            result = train_worker(ctx.cfg, spec, a.warmup, a.steps, spec.get("profile", False))
    except Exception as e:  # the parent's table shows the exception's own last line, not a progress bar
        last = (str(e).strip().splitlines() or [""])[-1][:300]
        Path(a.result).write_text(json.dumps({"error": run.redact(f"{type(e).__name__}: {last}")}))
        raise
    Path(a.result).write_text(json.dumps(result))


def spawn(ctx: run.Context, name: str, spec: dict, extra_sets: list[str]) -> dict:
    a = ctx.args
    with tempfile.NamedTemporaryFile(prefix="bench-", suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, "-m", "scripts.bench", "--recipe", a.recipe, *(["--tiny"] if a.tiny else []),
           *[x for s in [*a.sets, *spec.get("sets", []), *extra_sets] for x in ("--set", s)],
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--gen-samples", str(a.gen_samples),
           "--worker", json.dumps(spec), "--result", str(result)]
    log.info("[%s] %s", name, spec["what"])
    t = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=5)
    with subprocess.Popen(cmd, cwd=paths.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        for line in proc.stderr:  # the worker's progress, shown as it comes (progress bars left out)
            line = line.rsplit("\r", 1)[-1]
            if re.match(r"\d\d:\d\d:\d\d |error:", line):
                sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
    try:
        out = json.loads(result.read_text() or "{}")
        if proc.returncode != 0 or "error" in out:
            err = out.get("error") or next((x for x in reversed(tail) if x.startswith("error:")), "")
            log.error("[%s] failed (exit %d): %s", name, proc.returncode, err)
            return {"what": spec["what"], "error": run.redact(err or f"exit {proc.returncode}")}
    finally:
        result.unlink(missing_ok=True)
    log.info("[%s] done in %.0fs", name, time.time() - t)
    return {"what": spec["what"], **out}


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


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def memory_column(tr: dict) -> tuple[str, str]:
    """Peak VRAM on a GPU (what limits the batch there), peak host RSS on a CPU."""
    gpu = any("peak_vram_mb" in r for r in tr.values())
    return ("peak_vram_mb", "VRAM") if gpu else ("peak_rss_mb", "RSS")


def report(res: dict) -> tuple[str, list[str]]:
    """The Markdown tables and the ratio lines."""
    tr, peak = res["training"], res["matmul_peak_gflops"]
    ours = tr.get("ours", {})
    mem_key, mem_name = memory_column(tr)
    lines = [f"# Benchmark: {res['recipe']} ({res['base_model']})", "",
             f"{res['time']}, git {res['git_commit']}; {res['machine']['cpu']}, {res['machine']['cores']} cores"
             + (f", {res['machine']['gpu']}" if "gpu" in res["machine"] else "")
             + f"; load average at start {res['machine']['load_average_at_start'][0]}.",
             f"Matmul peak measured in this run: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s. "
             f"{res['warmup']} warm-up steps, then {res['steps']} timed steps per variant "
             + (f"(best of {res['rounds']} interleaved rounds) " if res["rounds"] > 1 else "") +
             f"(the recipe's batch {res['batch_size']} x grad_accum {res['grad_accum']}; the micro column shows how "
             "each row split it).", "",
             f"| training | precision | micro x accum | s/step | non-pad tok/s | examples/s | padding | peak {mem_name} GB "
             "| MFU | tok/s vs ours |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in tr.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} ||||||||")
            continue
        rel = r["tokens_per_s"] / ours["tokens_per_s"] if ours.get("tokens_per_s") else None
        split = f"{r['micro_batch']} x {r['grad_accum']}" if "micro_batch" in r else "-"
        lines.append(f"| {name}: {r['what']} | {r['precision']} | {split} | {fmt(r['s_per_step'])} "
                     f"| {fmt(r['tokens_per_s'], 1)} "
                     f"| {fmt(r['examples_per_s'])} | {r['padding_share']:.0%} | {r[mem_key] / 1024:.2f} "
                     f"| {r['mfu']:.1%} | {fmt(rel)}x |")
    left_out = [name + " " + ", ".join(f"step {c['step']} ({c['seconds']:.1f} s)" for c in r["compile_steps_left_out"])
                for name, r in tr.items() if r.get("compile_steps_left_out")]
    if left_out:
        lines += ["", "Timed steps in which torch.compile built a graph, left out of that row's figures: "
                  + "; ".join(left_out) + "."]
    if res["rounds"] > 1:
        lines += ["", "Seconds/step in each round (the table keeps the best): " + "; ".join(
            f"{name} {', '.join(fmt(x) for x in r.get('s_per_step_by_round', []))}" for name, r in tr.items()) + "."]
    lines += profile_table(tr)
    g = res.get("generation", {})
    if "error" in g:
        lines += ["", f"Generation benchmark failed: {g['error']}"]
    elif g:
        lines += ["", f"| generation ({g['samples']} prompts, greedy, up to {g['max_new_tokens']} new tokens, "
                      f"{g['precision']}) | batch | seconds | samples/s | output tok/s |", "|---|---:|---:|---:|---:|"]
        for name in ("batched", "one_at_a_time", "batched_8"):
            if name not in g:
                continue
            x = g[name]
            label = name.replace("_", " ").replace("batched 8", "batched at 8, for comparison")
            lines.append(f"| {label} | {x['batch_size']} | {fmt(x['seconds'], 1)} "
                         f"| {fmt(x['samples_per_s'], 3)} | {fmt(x['output_tokens_per_s'], 1)} |")
        lines.append(f"\nGreedy outputs identical batched vs one at a time: {g['identical_outputs']}/{g['samples']}.")
    lines += ["", "## Against the targets", ""]
    checks = res["checks"]
    lines += [f"- {c['name']}: {c['value']} (target {c['target']}) -> {'met' if c['met'] else 'NOT met'}"
              for c in checks]
    return "\n".join(lines) + "\n", [f"{c['name']}: {c['value']} (target {c['target']}) "
                                      f"{'met' if c['met'] else 'NOT met'}" for c in checks]


def profile_table(tr: dict) -> list[str]:
    """One profiled step per variant (--profile): how much the host issued and how busy the GPU was."""
    rows = {name: r["profile"] for name, r in tr.items() if "profile" in r}
    if not rows:
        return []
    gpu = any("device_kernels" in p for p in rows.values())
    out = ["", "One step per variant under torch.profiler (not timed; `top` by "
           + ("GPU kernel" if gpu else "operator") + " self time). Top-level ATen operators are what Python and "
           "autograd issue one by one" + ("; a GPU busy share well below 100% means the GPU waited for the host."
                                           if gpu else "."), "",
           "| profiled step | span ms | ATen ops | GPU kernels | GPU busy | top |", "|---|---:|---:|---:|---:|---|"]
    for name, p in rows.items():
        top = ", ".join(f"{t['name'][:48]} {t['self_ms']:.1f} ms x{t['count']}" for t in p["top"][:3])
        busy = f"{p['device_busy_ms']:,.1f} ms ({p['device_busy_share']:.0%})" if "device_busy_ms" in p else "-"
        out.append(f"| {name} | {p['span_ms']:,.1f} | {p['aten_ops']:,} | {fmt(p.get('device_kernels'))} | {busy} "
                   f"| {top} |")
    traces = [p["trace"] for p in rows.values() if p.get("trace")]
    if traces:
        out += ["", f"Traces (open in ui.perfetto.dev): {Path(traces[0]).parent}/"]
    return out


def ratio_checks(res: dict) -> list[dict]:
    tr, g = res["training"], res.get("generation", {})
    ours = tr.get("ours", {})
    checks = []

    def ratio(name: str, other: str, key: str, target: float) -> None:
        o = tr.get(other, {})
        if ours.get(key) and o.get(key):
            r = ours[key] / o[key]
            checks.append({"name": name, "value": f"{r:.2f}x", "target": f">= {target}x", "met": r >= target})

    gpu = "gpu" in res["machine"]
    vs_trl = GPU_VS_TRL if gpu else TARGETS["vs_trl"]
    trl = max((k for k in ("trl-defaults", "trl-defaults-fp32") if tr.get(k, {}).get("tokens_per_s")),
              key=lambda k: tr[k]["tokens_per_s"], default=None)
    if trl:
        ratio(f"training tokens/s, ours vs {trl} (the faster TRL row)", trl, "tokens_per_s", vs_trl)
        ratio(f"training examples/s, ours vs {trl}", trl, "examples_per_s", vs_trl)
    want = (res.get("gpu_targets") or {}) if gpu and res.get("shape") == "full" else {}
    if want.get("gpu_tokens_per_s") and ours.get("tokens_per_s"):
        v = ours["tokens_per_s"]
        checks.append({"name": f"training non-padding tokens/s (ours, {res['machine']['gpu']}, MFU "
                               f"{ours.get('mfu', 0):.1%})", "value": f"{v:,.0f}",
                       "target": f">= {want['gpu_tokens_per_s']:,}", "met": v >= want["gpu_tokens_per_s"]})
    capped = tr.get(f"ours-cap{want.get('memory_cap_gb')}gb", {})
    if want.get("memory_cap_gb") and capped.get("peak_vram_reserved_mb"):
        gb = capped["peak_vram_reserved_mb"] / 1024
        checks.append({"name": f"peak GPU memory (reserved) at a {want['memory_cap_gb']} GB cap, auto micro-batch "
                               f"{capped['micro_batch']} x {capped['grad_accum']}", "value": f"{gb:.2f} GB",
                       "target": f"<= {want['capped_peak_gb']} GB", "met": gb <= want["capped_peak_gb"]})
    ratio("training tokens/s, ours vs reference", "reference", "tokens_per_s", TARGETS["vs_reference"])
    if g.get("speedup"):
        ok = g["identical_outputs"] == g["samples"]
        checks.append({"name": "generation samples/s, batched vs one at a time", "value": f"{g['speedup']:.2f}x",
                       "target": f">= {TARGETS['generation']}x", "met": g["speedup"] >= TARGETS["generation"]})
        checks.append({"name": "greedy outputs identical", "value": f"{g['identical_outputs']}/{g['samples']}",
                       "target": "all", "met": ok})
    mem_key, mem_name = memory_column(tr)
    if ours.get(mem_key) and not gpu:  # the CPU's budget; on a GPU the cap rows above say what fits where
        gb = ours[mem_key] / 1024
        checks.append({"name": f"peak memory while training (ours, {mem_name})", "value": f"{gb:.2f} GB",
                       "target": f"<= {TARGETS['peak_gb']} GB", "met": gb <= TARGETS["peak_gb"]})
    return checks


def body(ctx: run.Context) -> None:
    if ctx.args.worker:
        return worker_body(ctx)
    cfg, a = ctx.cfg, ctx.args
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        raise UserError("--steps and --rounds must be >= 1, --warmup >= 0")
    rp = ctx.paths
    if not rp.split("train").exists():
        raise UserError(f"{rp.split('train')} does not exist; run make prepare RECIPE={cfg.name} first")
    plan = run_plan.resolve(cfg)
    specs = variants(cfg, plan)
    only = [x.strip() for x in a.only.split(",")] if a.only else list(specs) + ["generation"]
    unknown = [x for x in only if x not in specs and x != "generation"]
    if unknown:
        raise UserError(f"--only: unknown variant(s) {', '.join(unknown)}; choose from "
                        f"{', '.join([*specs, 'generation'])}")
    log.info("probing the matmul peak ...")
    res: dict[str, Any] = metadata.describe(cfg, "bench", machine=machine(), steps=a.steps, warmup=a.warmup, rounds=a.rounds,
                                       batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                                       shape=cfg.tiny.shape if cfg.tiny_mode else "real", gpu_targets=dict(cfg.bench))
    res["matmul_peak_gflops"] = matmul_peak(plan.device)
    log.info("matmul peak: %s GFLOP/s", res["matmul_peak_gflops"])
    settings = ["train.save_strategy=no", "train.eval_strategy=no", "train.load_best_model_at_end=false",
                "runtime.logging_steps=100000", "train.warmup_steps=0", "train.warmup_ratio=0.0"]
    res["training"] = {}
    names = [x for x in specs if x in only]
    if a.profile:  # this run's traces only, not a stale one of a variant run before
        shutil.rmtree(paths.bench_dir() / f"{cfg.run}-traces", ignore_errors=True)
    for rnd in range(1, a.rounds + 1):  # every variant once per round, in the same order
        for name in names:
            profile = a.profile and rnd == 1  # one extra, untimed step under the profiler (first round only)
            total = f"train.max_steps={a.warmup + a.steps + profile}"
            r = spawn(ctx, f"{name} round {rnd}/{a.rounds}" if a.rounds > 1 else name,
                      {**specs[name], "name": name, "profile": profile}, [total, *settings])
            if "error" not in r:
                peak = max(res["matmul_peak_gflops"].values())  # the machine's best, whatever precision ran
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
                mem = (f"peak VRAM {r['peak_vram_mb'] / 1024:.2f} GB" if "peak_vram_mb" in r
                       else f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")  # the figure the table shows
                log.info("[%s] %.3f s/step, %.1f non-pad tok/s, %s, MFU %.1f%%", name, r["s_per_step"],
                         r["tokens_per_s"], mem, 100 * r["mfu"])
            best = res["training"].get(name)
            rounds = (best or {}).get("s_per_step_by_round", []) + [r.get("s_per_step")]
            if best is None or "error" in best or ("error" not in r and r["s_per_step"] < best["s_per_step"]):
                if best and "profile" in best:  # the profile is of round 1's run, whichever round was best
                    r["profile"] = best["profile"]
                best = r  # best of the rounds, as timeit reports: the run least disturbed by the machine
            best["s_per_step_by_round"] = rounds
            res["training"][name] = best
    if "generation" in only:
        res["generation"] = spawn(ctx, "generation", {"kind": "generation", "what": "batched vs one at a time"}, [])
    res["checks"] = ratio_checks(res)
    md, lines = report(res)
    out = paths.bench_dir()
    io.atomic_write_json(out / f"{cfg.run}.json", res)
    io.atomic_write_text(out / f"{cfg.run}.md", md)
    print(md.split("## Against the targets")[0].rstrip() + "\n")
    for line in lines:
        print(line)
    print(f"\nwrote {out / (cfg.run + '.json')} and {out / (cfg.run + '.md')}")
    failed = [k for k, v in [*res["training"].items(), ("generation", res.get("generation", {}))] if "error" in v]
    if failed:
        raise UserError(f"variant(s) failed: {', '.join(failed)} (see the table; rerun with --only NAME --debug)")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per variant (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant (default 2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every training variant this many times, interleaved, and keep each one's best")
    ap.add_argument("--gen-samples", type=int, default=16, help="test prompts for the generation benchmark")
    ap.add_argument("--only", help="comma-separated variants to run (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="one more (untimed) step per variant under torch.profiler: operators, GPU kernels and "
                         "GPU busy time in the table; traces -> outputs/bench/<run>-traces/<variant>.json.gz")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    return run.main("bench", body, argv, __doc__, add_args=add_args, lock=False)


if __name__ == "__main__":
    sys.exit(main())
