"""Which Python runs the project: the one Make was given, or a project venv when that one cannot install packages.

    python3 -m common.core.bootstrap --venv .venv       # the Makefile runs it before anything else

Prints one line, `PY=<python>` or `error: <why and what to do>` (exit 2); what it does on the way goes to stderr.
Standard library only: it runs on a machine where nothing is installed yet.

- a Python that can install packages (pip present; a virtual environment, or a Python that does not declare itself
  externally managed by PEP 668): used as it is, after installing PyYAML and python-dotenv when missing (the recipe
  reader needs them before `make install` runs);
- otherwise (Debian's and Ubuntu's system Pythons refuse pip, unless PIP_BREAK_SYSTEM_PACKAGES says otherwise; a
  venv made `--without-pip` has none): the project's own venv at --venv, created once from this Python with its
  packages visible (a system CUDA torch is kept, not replaced by the CPU build), and used by every later `make` (the
  Makefile picks it when it exists and no other venv is active); a half-made one is removed. A Python that cannot
  make one either (Debian without python3-venv) gets one line saying what to install;
- FT_OFFLINE=1 (--offline: no package index, e.g. the borrowed GPU): the Python given, as it is.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

MIN_PYTHON = (3, 10)
PARSE_PACKAGES = ("pyyaml", "python-dotenv")  # what Make's parse step imports besides the standard library


def can_install() -> str | None:
    """None when pip may install into this Python, else why not (one clause)."""
    if importlib.util.find_spec("pip") is None:
        return "has no pip"
    in_venv = sys.prefix != sys.base_prefix
    marker = Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED"
    overridden = os.environ.get("PIP_BREAK_SYSTEM_PACKAGES", "").lower() in ("1", "true", "yes", "on")  # pip's own
    if not in_venv and marker.exists() and not overridden:
        return "is managed by the system (PEP 668: pip refuses to install into it)"
    return None


def has_parse_packages() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("yaml", "dotenv"))


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"  # where the Makefile looks for it


def pip_install(python: Path | str, *packages: str) -> None:
    print(f"installing {' '.join(packages)} for the recipe reader", file=sys.stderr, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                   check=True, stdout=sys.stderr)


def choose(venv: Path, offline: bool = False) -> Path | str:
    """The Python to use (after installing the parse-time packages into it); SystemExit(error line) when none.
    `offline` (FT_OFFLINE=1, a machine without a package index): this Python as it is, nothing installed."""
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(f"error: {sys.executable} is Python {sys.version.split()[0]}; this project needs Python >= "
                         f"{'.'.join(map(str, MIN_PYTHON))} (make ... PY=/path/to/python3.11)")
    if offline:
        if not has_parse_packages():
            raise SystemExit(f"error: FT_OFFLINE=1 installs nothing, and {sys.executable} lacks PyYAML or "
                             "python-dotenv; put them on its path (docs/gpu.md) or unset FT_OFFLINE")
        return sys.executable
    why = can_install()
    if why is None:
        if not has_parse_packages():
            pip_install(sys.executable, *PARSE_PACKAGES)
        return sys.executable
    python = venv_python(venv)
    if Path(sys.prefix).resolve() == venv.resolve():  # the project's venv itself cannot install: it is broken
        raise SystemExit(f"error: the project's virtual environment {venv} {why}; delete it (rm -rf {venv}) and run "
                         "make again")
    if not python.exists():
        print(f"{sys.executable} {why}: creating the project's own virtual environment {venv} (it sees this "
              "Python's packages, a CUDA torch included; every later make uses it)", file=sys.stderr, flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                              stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if made.returncode != 0 or not python.exists():
            shutil.rmtree(venv, ignore_errors=True)  # never leave a half-made venv for the next make to pick
            last = (made.stderr.strip().splitlines() or ["no message"])[-1]
            raise SystemExit(f"error: {sys.executable} {why} and cannot create a virtual environment ({last}); on "
                             "Debian/Ubuntu: apt install python3-venv, or make ... PY=/path/to/a/python/with/pip")
    else:
        print(f"{sys.executable} {why}: using the project's virtual environment {venv}", file=sys.stderr, flush=True)
    probe = subprocess.run([str(python), "-c", "import yaml, dotenv"], capture_output=True)
    if probe.returncode != 0:
        pip_install(python, *PARSE_PACKAGES)
    return python


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, required=True, help="where the project's own venv is (or is made)")
    ap.add_argument("--offline", action="store_true", help="install nothing (FT_OFFLINE=1): this Python as it is")
    args = ap.parse_args(argv)
    try:
        print(f"PY={choose(args.venv.resolve(), args.offline)}")
    except SystemExit as e:
        print(e.code if isinstance(e.code, str) else "error: bootstrap failed")
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd))} failed (exit {e.returncode}); is the package index reachable?")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
