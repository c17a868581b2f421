"""The whole GPU verification in one call, inside 8 minutes on one H200 (the parts: common/measurement/gpucheck_parts.py).

    make gpu-check                                  # on the CUDA machine (docs/gpu.md: the one device call)
    make gpu-check DRY_RUN=1                        # the same orchestration on a CPU: tiny sizes, seconds of budget
    python scripts/gpu_check.py [--dry-run] [--only bench-tinyllama,t4-tinyllama-fp16-16gb] [--budget-scale 1.5]

Runs the gpu-marked tests (sharded by test id, in parallel), `make all TINY=1` for one recipe per architecture
family (no `make export`: its llama.cpp gate runs on the CPU, docs/gpu.md), and `make bench SHAPE=full --profile` for tinyllama, mistral-xauusd
and llama3-alpaca, then a T4-sized run (tinyllama fp16 under a 16 GB cap) and a 24 GB-capped 8B run, each part
under its own budget (an overrunning part is killed and reported; the rest still runs).

Writes outputs/gpu-check/<date>-<gpu>.json and .md (each part: passed / failed with the exception's last line /
overran, elapsed; every bench figure with the GPU named), logs/<part>.log and each part's artifacts in work/<part>/.
Exit code 0 when every part passed (or, in the dry run, was validated), 1 when one did not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from common.core.io import UserError
from common.measurement import gpucheck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="on a CPU: tiny sizes, stand-in budgets (seconds)")
    ap.add_argument("--only", help="comma-separated parts to run (default: all)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (default 1)")
    a = ap.parse_args(argv)
    if a.budget_scale <= 0:
        print("error: --budget-scale must be > 0", file=sys.stderr)
        return 2
    try:
        rep = gpucheck.run(a.dry_run, [x.strip() for x in a.only.split(",") if x.strip()] if a.only else None,
                           a.budget_scale)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] in ("passed", "validated") for r in rep["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
