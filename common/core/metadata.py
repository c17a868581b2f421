"""What every artifact says about itself: recipe, base model, git commit, time, host, package versions."""
from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from typing import Any

from common.core import config, paths, stamps

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def git_commit() -> str | None:
    """The repository's short commit, with -dirty when tracked files changed; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(paths.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(paths.REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def describe(cfg: config.Config, step: str, **extra: Any) -> dict:
    """The self-description every artifact carries."""
    return {
        "recipe": cfg.name,
        "run": cfg.run,
        "tiny_mode": cfg.tiny_mode,
        "recipe_file": cfg.recipe_file,
        "base_model": cfg.model.name_or_path,
        "task": cfg.task,
        "step": step,
        "git_commit": git_commit(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": versions(),
        "settings": stamps.step_settings(cfg, step) if step in stamps.STEP_KEYS else None,
        **extra,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark), in MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by this process (None without CUDA)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def peak_gpu_reserved_mb() -> float | None:
    """Peak GPU memory held by this process's caching allocator (what an out-of-memory error depends on)."""
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if torch.cuda.is_available() else None


def hardware() -> dict:
    """The machine a step ran on: GPU name and memory, or the CPU model and core count."""
    import os

    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                "count": torch.cuda.device_count()}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"device": "cpu", "name": name, "cores": os.cpu_count()}
