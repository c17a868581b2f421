"""More than one process: `make train NPROC=N` runs scripts/02_sft_qlora.py under `accelerate launch` as DDP.

    python -m common.core.dist --recipe tinyllama --nproc 2     # prints the launch command, or one error line

The recipe's effective batch (batch_size x grad_accum) stays what the optimisation sees: each of the N processes
takes 1/N of it (common/training/batching.py divides the accumulation), gradients are averaged, and the loss is normalised
over the answer tokens of all processes (as with one). Only rank 0 writes artifacts, logs to the step's log file,
holds the run lock and writes run_info.json; the others log warnings to stderr. Checkpoints hold the full model
state, so a run resumes with any process count. DDP is the one engine offered: it runs here on the CPU (gloo) and is
tested; sharding engines (FSDP, DeepSpeed ZeRO) were removed because nothing here can run them (DeepSpeed is not
installable offline, FSDP over gloo with PEFT never ran). Launches that cannot work stop with one line first.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from common.core import config, paths
from common.core.io import UserError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def engine() -> str:
    """The engine this process runs under."""
    return "ddp" if world() > 1 else "single process"


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


def total(value: int) -> int:
    """The sum of `value` over every process (each must call it); the value itself in a single process."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return int(value)
    import torch

    device = torch.device("cuda", local_rank()) if td.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    td.all_reduce(t)
    return int(t.item())


def start(device: str) -> None:
    """In a multi-process run: bind to the launcher's lifetime and start the process group (gloo on a CPU, NCCL
    on GPUs) before any model loads, so every rank sees the same files and the right device."""
    if world() <= 1:
        return
    die_with_launcher()
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def load_engine_config() -> object:
    """The shipped accelerate configuration, read by accelerate's own loader (unknown keys fail there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(paths.DDP_CONFIG))


def check(cfg: config.Config, nproc: int, gpus: int) -> None:
    """Refuse what cannot run, with one line, before any process starts."""
    if nproc < 1:
        raise UserError(f"NPROC must be a number >= 1, got {nproc}")
    eff = cfg.train.batch_size * cfg.train.grad_accum
    if eff % nproc:
        raise UserError(f"the effective batch train.batch_size x train.grad_accum = {eff} does not split over "
                        f"NPROC={nproc} processes; use an NPROC that divides {eff}")
    if nproc > 1 and getattr(cfg.train, "precompute_ref", False):  # TRL caches it in a per-process temp file
        raise UserError(f"train.precompute_ref needs one process (TRL keeps the precomputed log-probs in a file of "
                        f"its own process); set it false for NPROC={nproc}")
    if gpus and nproc > gpus:
        raise UserError(f"NPROC={nproc} but this machine has {gpus} GPU(s); one process per GPU")
    load_engine_config()


def launch_command(nproc: int, python: str = sys.executable) -> list[str]:
    """The launcher to put before scripts/02_sft_qlora.py (just python for one process)."""
    if nproc <= 1:
        return [python]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(paths.DDP_CONFIG),
            "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port",
            os.environ.get("MASTER_PORT", "29511")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--nproc", default="")
    ap.add_argument("--python", default=sys.executable)
    a, _ = ap.parse_known_args(argv)
    try:
        try:
            nproc = int(a.nproc or "1")
        except ValueError:
            raise UserError(f"NPROC must be a number >= 1, got {a.nproc!r}") from None
        cfg = config.load(a.recipe, a.sets, a.tiny)
        import torch

        check(cfg, nproc, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except (UserError, config.ConfigError) as e:
        print(f"error: {e}")
        return 2
    print(shlex.join(launch_command(nproc, a.python)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
