"""Speed benchmark: this project's training step and evaluation generation against the usual ways, in one run.

    make bench                                     # the default recipe; prepares its data first if needed
    make bench RECIPE=smollm2-xauusd BENCH="--steps 8 --gen-samples 32"
    python scripts/bench.py --recipe smollm2 [--only ours,trl-defaults] [--steps 5] [--warmup 2] [--rounds 2]
    make bench RECIPE=tinyllama SHAPE=full BENCH="--profile --only ours,ours-padded"   # where a step's time goes

A thin script over common/measurement/bench_rows.py (what each row trains), common/measurement/bench_measure.py (how a row is measured)
and common/measurement/bench_report.py (the tables). On the recipe's prepared train split and base model:

  training    ours               the recipe's own training step (common/training/builder.py, as 02_sft_qlora runs it)
              ours-<change>      ours with one speed choice undone, to show what each one pays; on a GPU
                                 also the recipe's own micro-batch split, padded batches, varlen attention,
                                 Liger, gradient checkpointing, eager attention and the frozen weights' dtype
              trl-defaults       plain TRL SFTTrainer with every default kept (bf16 autocast, gradient
                                 checkpointing, the model's own chat template) and the same LoRA settings
              trl-defaults-fp32  the same with bf16=False, so the precision matches ours
              reference          the reference setups' way: HF Trainer + PEFT, every example padded to 512 tokens,
                                 loss on all tokens, none of this project's speed choices
  generation  batched (eval.batch_size, length-sorted, left-padded, KV cache) against one prompt at a time,
              greedy, on the same test prompts; reports whether the outputs agree.

Each variant runs in its own process (a clean peak-memory figure): --warmup steps that are not timed, then
--steps timed steps. Reported: seconds/step, non-padding tokens/s, examples/s, peak memory (RSS; peak VRAM on
a GPU) and model FLOPs utilisation (MFU) against the matmul peak probed at the start of the same run (the
faster of fp32 and bf16, so a precision with a slow matmul does not look efficient). Model FLOPs per
non-padding token = 4 x frozen linear parameters (forward + activation-gradient backward) + 6 x LoRA
parameters; attention scores (about 1% at these lengths) and gradient-checkpointing recomputation are not
counted. Run it on an otherwise idle machine: the load average at the start is recorded.

--profile runs one more step per variant under torch.profiler (common/measurement/profiling.py): top-level ATen operators
issued, GPU kernels, the share of the step the GPU was busy, the top operators/kernels, and a trace per variant.

Writes outputs/bench/<run>.json (every figure, the machine, versions) and outputs/bench/<run>.md (the tables);
with --profile also outputs/bench/<run>-traces/<variant>.json.gz.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.core import io, metadata, paths, run
from common.core.io import UserError
from common.measurement.bench_measure import (
    generation_worker,
    machine,
    matmul_peak,
    train_worker,
)
from common.measurement.bench_report import ratio_checks, report
from common.measurement.bench_rows import variants
from common.training import plan as run_plan

log = logging.getLogger("ft")


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
                                       shape=cfg.tiny.shape if cfg.tiny_mode else "real")
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
