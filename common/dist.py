"""More than one process: `make train NPROC=N [DIST=ddp|fsdp|zero2|zero3]` runs scripts/02_sft_qlora.py under
`accelerate launch` with one of the configurations shipped in common/dist/ (DDP by default).

    python -m common.dist --recipe tinyllama --nproc 2 --dist ddp     # prints the launch command, or one error line

The recipe's effective batch (batch_size x grad_accum) stays what the optimisation sees: each of the N processes
takes 1/N of it (common/batching.py divides the accumulation), gradients are averaged, and the loss is normalised
over the answer tokens of all processes (as with one). Only rank 0 writes artifacts, logs to the step's log file,
holds the run lock and writes run_info.json; the others log warnings to stderr. Checkpoints hold the full model
state (DDP), so a run resumes with any process count. On a CPU only DDP runs (gloo); FSDP and DeepSpeed ZeRO need
GPUs (and ZeRO needs `pip install deepspeed`): anything else stops here with one line, before a process starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from common import config, paths
from common.io import UserError

CONFIG_DIR = paths.REPO / "common" / "dist"
ENGINES = {
    "ddp": "DistributedDataParallel: a full model copy per process, gradients averaged (NCCL on GPUs, gloo on CPU)",
    "fsdp": "PyTorch FSDP: weights, gradients and optimizer states sharded across GPUs (QLoRA: bf16 quant storage)",
    "zero2": "DeepSpeed ZeRO-2: optimizer states and gradients sharded across GPUs",
    "zero3": "DeepSpeed ZeRO-3: weights too sharded across GPUs",
}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def engine() -> str:
    """The engine this process runs under (accelerate launch exports which one)."""
    if world() <= 1:
        return "single process"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"deepspeed zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return "ddp"


def die_with_launcher() -> None:
    """Linux: end this process when its launcher dies (a kill -9 of `accelerate launch` must not leave ranks
    training, holding the GPU and the run lock)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def barrier() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()


def start(device: str) -> None:
    """In a multi-process run: bind to the launcher's lifetime and start the process group (gloo on a CPU, NCCL
    on GPUs) before any model loads, so every rank sees the same files and the right device."""
    if world() <= 1:
        return
    die_with_launcher()
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def config_file(dist: str) -> Path:
    if dist not in ENGINES:
        raise UserError(f"DIST={dist} is not an engine here; choose one of {', '.join(ENGINES)}")
    return CONFIG_DIR / f"{dist}.yaml"


def load_engine_config(dist: str) -> object:
    """The shipped accelerate configuration, read by accelerate's own loader (unknown keys fail there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(config_file(dist)))


def check(cfg: config.Config, nproc: int, dist: str, gpus: int) -> None:
    """Refuse what cannot run, with one line, before any process starts."""
    config_file(dist)  # a known engine
    if nproc < 1:
        raise UserError(f"NPROC must be a number >= 1, got {nproc}")
    if dist != "ddp" and nproc < 2:
        raise UserError(f"DIST={dist} shards across processes: give NPROC >= 2 (e.g. make train NPROC=2 DIST={dist})")
    eff = cfg.train.batch_size * cfg.train.grad_accum
    if eff % nproc:
        raise UserError(f"the effective batch train.batch_size x train.grad_accum = {eff} does not split over "
                        f"NPROC={nproc} processes; use an NPROC that divides {eff}")
    if dist != "ddp" and not gpus:
        raise UserError(f"DIST={dist} needs CUDA GPUs; on a CPU use DIST=ddp (gloo)")
    if gpus and nproc > gpus:
        raise UserError(f"NPROC={nproc} but this machine has {gpus} GPU(s); one process per GPU")
    if dist.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"DIST={dist} needs DeepSpeed: pip install deepspeed (or use DIST=ddp or DIST=fsdp)")
    if dist in ("fsdp", "zero3") and cfg.quantization.bits == 8:
        raise UserError(f"DIST={dist} cannot shard 8-bit (bitsandbytes int8) weights; use quantization.bits=4 or "
                        f"0, or DIST=ddp")
    load_engine_config(dist)


def launch_command(nproc: int, dist: str, python: str = sys.executable) -> list[str]:
    """The launcher to put before scripts/02_sft_qlora.py (just python for one process)."""
    if nproc <= 1 and dist == "ddp":
        return [python]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(config_file(dist)),
            "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port",
            os.environ.get("MASTER_PORT", "29511")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--nproc", default="")
    ap.add_argument("--dist", default="")
    ap.add_argument("--python", default=sys.executable)
    a, _ = ap.parse_known_args(argv)
    try:
        try:
            nproc = int(a.nproc or "1")
        except ValueError:
            raise UserError(f"NPROC must be a number >= 1, got {a.nproc!r}") from None
        dist = a.dist or "ddp"
        cfg = config.load(a.recipe, a.sets, a.tiny)
        import torch

        check(cfg, nproc, dist, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except (UserError, config.ConfigError) as e:
        print(f"error: {e}")
        return 2
    print(shlex.join(launch_command(nproc, dist, a.python)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
