"""What make gpu-check runs: its parts (commands, budgets, dry-run stand-ins) and the bench rows each bench picks.

`python -m common.measurement.gpucheck_parts --bench-rows RECIPE [--switches a,b] [--full]` prints the --only list a bench part
passes to `make bench` (the variants of common/measurement/bench_rows.py as they are on this machine).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

TOTAL_BUDGET_S = 480  # 8 minutes on one H200: the borrowed machine's 15 leave room for its start and transfers
DRY_TOTAL_BUDGET_S = 150
GPU_TEST_SHARDS = 4
# Seconds on one H200 per part (unmeasured estimates until the first real run; re-budget by its elapsed column).
# The parallel phase counts once (its largest), plus the others and ~10 s of test collection: <= TOTAL_BUDGET_S.
BUDGET_S = {"parallel": 160, "bench-tinyllama": 105, "bench-mistral-xauusd": 80, "bench-llama3-alpaca": 70,
            "t4-tinyllama-fp16-16gb": 25, "cap24gb-llama3-alpaca": 30}
# The GPU switches (docs/gpu.md): a bench row whose override sets one of these is a decision row.
SWITCHES = ("padding_free", "varlen_attention", "liger", "upcast_frozen", "micro_batch")
# Only for tests: a part name whose command is replaced by one that raises, to check the report and that the
# rest still runs.
FAIL_ENV = "FT_GPU_CHECK_FAIL"



@dataclass
class Part:
    """One verification step: a shell command with a budget, on the GPU and in the CPU dry run."""

    name: str
    what: str
    cmd: str  # on the GPU; {make} and {py} are filled in
    budget_s: float
    parallel: bool = False  # started with the other parallel parts, before the parts that run alone
    dry_cmd: str | None = None  # the dry run's command; None: the dry run only validates `checks`
    dry_budget_s: float = 60
    checks: list[str] = field(default_factory=list)  # common.core.config flags the part uses (validated in the dry run)
    bench: str | None = None  # the bench run whose outputs/bench/<run>.json this part writes


def _bench_cmd(recipe: str, switches: tuple[str, ...], bench: str, sets: str = "") -> str:
    sw = ",".join(switches) or "-"
    rows = f"rows=$({{py}} -m common.measurement.gpucheck_parts --bench-rows {recipe} --switches {sw} --full)"
    args = f' ARGS="{sets}"' if sets else ""
    return f'{rows} && {{make}} bench RECIPE={recipe} SHAPE=full{args} BENCH="--profile --only $rows {bench}"'


def _tiny_bench_cmd(recipe: str) -> str:
    """The dry run's bench: the rows the GPU run would pick here (printed), then only ours for one step."""
    rows = f"rows=$({{py}} -m common.measurement.gpucheck_parts --bench-rows {recipe} --switches -)"
    return f'{rows} && echo "rows here: $rows" && {{make}} bench RECIPE={recipe} TINY=1 ' \
           f'BENCH="--only ours --steps 1 --warmup 1"'


def parts() -> list[Part]:
    """Every part of the check, in order. Budgets are seconds on one H200 (sum of the parallel phase's largest and
    the others' <= TOTAL_BUDGET_S); the first real run's elapsed column is what to re-budget them by."""
    par = BUDGET_S["parallel"]
    pytest = "{py} -m pytest -q -m gpu -p no:cacheprovider --basetemp={work}/pytest {shard%d}"
    out = [Part(f"gpu-tests-{k + 1}", f"pytest -m gpu, shard {k + 1} of {GPU_TEST_SHARDS} (by test id)",
                pytest % k, par, parallel=True, dry_cmd=pytest % k, dry_budget_s=60) for k in range(GPU_TEST_SHARDS)]
    out += [
        Part("pipeline-llama", "make all TINY=1 on CUDA: tinyllama (llama, causal)",
             "{make} all RECIPE=tinyllama TINY=1", par, parallel=True,
             dry_cmd="{make} prepare RECIPE=tinyllama TINY=1", dry_budget_s=60, checks=["--recipe tinyllama --tiny"]),
        Part("pipeline-mistral", "make all TINY=1 on CUDA: mistral-xauusd (mistral)",
             "{make} all RECIPE=mistral-xauusd TINY=1", par, parallel=True, checks=["--recipe mistral-xauusd --tiny"]),
        Part("pipeline-t5", "make all TINY=1 on CUDA: flan-t5 (t5, seq2seq)",
             "{make} all RECIPE=flan-t5 TINY=1", par, parallel=True, checks=["--recipe flan-t5 --tiny"]),
        # no make export here: its gate runs every file in llama.cpp, which the borrowed GPU (Python 3.12, no
        # package index) does not have; export is checked on the CPU (tests/test_llamacpp.py, test_export.py)
        *[Part(f"pipeline-{'-'.join(pair)}", f"make all TINY=1 on CUDA: {', '.join(pair)}",
               " && ".join(f"{{make}} all RECIPE={r} TINY=1" for r in pair),
               par, parallel=True, checks=[f"--recipe {r} --tiny" for r in pair])
          for pair in (FAMILY_RECIPES[:2], FAMILY_RECIPES[2:])],
        # in the parallel phase: its peak memory per process is what it measures (does the recipe fit a T4's 16 GB);
        # its speed shares the GPU and is not a figure to quote
        Part("bench-families-t4", "one training step of each new family at its real shape, T4-sized (16 GB, fp16)",
             " && ".join(f'{{make}} bench RECIPE={r} SHAPE=full ARGS="{T4_SETS}" BENCH="--only ours --steps 1 '
                         f'--warmup 1"' for r in FAMILY_RECIPES), par, parallel=True,
             checks=[f"--recipe {r} --tiny --set tiny.shape=full {T4_SETS}" for r in FAMILY_RECIPES]),
        Part("standins-full", "build the full-shape stand-ins the benches load (1.1B, 7B, 8B; GPU otherwise idle)",
             f'{{py}} -c "{BUILD_FULL}"', par, parallel=True,
             checks=[f"--recipe {r} --tiny --set tiny.shape=full" for r in FULL_RECIPES]),
        Part("bench-tinyllama", "bench at TinyLlama-1.1B's shape: ours, TRL defaults, every GPU switch, generation",
             _bench_cmd("tinyllama", SWITCHES, "--steps 3 --warmup 1 --gen-samples 16",
                        "--set eval.max_new_tokens=64 --set eval.batch_size=auto"),  # auto vs 8: the opt-in's row
             BUDGET_S["bench-tinyllama"], dry_cmd=_tiny_bench_cmd("tinyllama"), dry_budget_s=85, bench="tinyllama-full",
             checks=["--recipe tinyllama --tiny --set tiny.shape=full --set eval.max_new_tokens=64 "
                     "--set eval.batch_size=auto"]),
        Part("bench-mistral-xauusd", "bench at Mistral-7B's shape: ours, TRL defaults, the memory switches, "
             "generation at the recipe's max_new_tokens",
             _bench_cmd("mistral-xauusd", ("padding_free", "varlen_attention", "upcast_frozen"),
                        "--steps 2 --warmup 1 --gen-samples 8"),
             BUDGET_S["bench-mistral-xauusd"], bench="mistral-xauusd-full",
             checks=["--recipe mistral-xauusd --tiny --set tiny.shape=full"]),
        Part("bench-llama3-alpaca", "bench at Llama-3-8B's shape: ours, TRL defaults, micro-batch auto, "
             "generation at the recipe's max_new_tokens",
             _bench_cmd("llama3-alpaca", ("micro_batch",), "--steps 2 --warmup 1 --gen-samples 8"),
             BUDGET_S["bench-llama3-alpaca"], bench="llama3-alpaca-full",
             checks=["--recipe llama3-alpaca --tiny --set tiny.shape=full"]),
        Part("t4-tinyllama-fp16-16gb", "T4-sized: tinyllama fp16 under a 16 GB cap (training step and generation)",
             f'{{make}} bench RECIPE=tinyllama SHAPE=full ARGS="{T4_SETS} --set eval.max_new_tokens=64" '
             f'BENCH="--only ours,generation --steps 2 --warmup 1 --gen-samples 16"',
             BUDGET_S["t4-tinyllama-fp16-16gb"], bench="tinyllama-full",
             checks=[f"--recipe tinyllama --tiny --set tiny.shape=full {T4_SETS}"]),
        Part("cap24gb-llama3-alpaca", "24 GB-capped 7-8B: llama3-alpaca under a 24 GB cap (training step)",
             f'{{make}} bench RECIPE=llama3-alpaca SHAPE=full ARGS="{CAP24_SETS}" '
             f'BENCH="--only ours --steps 2 --warmup 1"',
             BUDGET_S["cap24gb-llama3-alpaca"], bench="llama3-alpaca-full",
             checks=[f"--recipe llama3-alpaca --tiny --set tiny.shape=full {CAP24_SETS}"]),
    ]
    return out


FULL_RECIPES = ("tinyllama", "mistral-xauusd", "llama3-alpaca")
FAMILY_RECIPES = ("qwen2.5", "qwen3", "phi3.5", "llama3.2")  # the families people tune now (Qwen, Phi-3.5, Llama-3.2)
BUILD_FULL = ("from common import config, modeling; [print(modeling.model_source(config.load(r, ['tiny.shape=full'], "
              f"tiny=True)), flush=True) for r in {FULL_RECIPES!r}]")
T4_SETS = "--set runtime.gpu_memory_gb=16 --set train.precision=fp16"
CAP24_SETS = "--set runtime.gpu_memory_gb=24"


def bench_rows(recipe: str, switches: tuple[str, ...], full: bool) -> list[str]:
    """The bench variants this check runs for a recipe on this machine: ours, the plain-TRL-defaults row, each
    row that flips one of `switches`, and generation (names from common/measurement/bench_rows.py's variants, as they are here)."""
    from common.core import config
    from common.measurement import bench_rows as rows
    from common.training import plan

    cfg = config.load(recipe, ["tiny.shape=full"] if full else [], tiny=True)
    specs = rows.variants(cfg, plan.resolve(cfg))
    keep = [name for name, spec in specs.items()
            if name in ("ours", "trl-defaults")
            or any(s.split("=", 1)[0].rsplit(".", 1)[-1] in switches for s in spec.get("sets", []))]
    return keep + ["generation"]


def main(argv: list[str] | None = None) -> int:
    """`python -m common.measurement.gpucheck_parts --bench-rows RECIPE --switches a,b [--full]`: a bench part's --only list."""
    import argparse

    ap = argparse.ArgumentParser(description="Print the bench rows gpu-check runs for a recipe here.")
    ap.add_argument("--bench-rows", required=True, metavar="RECIPE")
    ap.add_argument("--switches", default=",".join(SWITCHES), help="comma-separated, or - for none")
    ap.add_argument("--full", action="store_true", help="at the real model's shape (SHAPE=full)")
    a = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    sw = tuple(x for x in a.switches.split(",") if x and x != "-")
    unknown = [x for x in sw if x not in SWITCHES]
    if unknown:
        print(f"error: unknown switch(es) {', '.join(unknown)}; choose from {', '.join(SWITCHES)}", file=sys.stderr)
        return 2
    print(",".join(bench_rows(a.bench_rows, sw, a.full)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
