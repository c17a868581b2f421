"""What every step script shares: command line, logging, errors, the run lock, atomic writes, metadata.

A step's `main(argv=None)` calls `run.main(step, body, argv, doc)`; it parses the common flags
(--recipe, --set, --tiny, --debug), loads the recipe, logs to the console and to outputs/<run>/logs/<step>.log,
holds the run's lock, and turns any expected failure into one line on stderr and exit code 2 (a traceback
only with --debug). It returns the exit code instead of exiting, so it is safe to call in a notebook cell.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from common import config, paths

log = logging.getLogger("ft")


class UserError(Exception):
    """A failure the user can fix (bad file, bad setting); printed as one line without a traceback."""


@dataclass
class Context:
    step: str
    args: argparse.Namespace
    cfg: config.Config
    paths: paths.RunPaths


# --------------------------------------------------------------------------- secrets
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.I)


def secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and v and len(v) >= 6]


def redact(text: str) -> str:
    for v in secret_values():
        text = text.replace(v, "***")
    return text


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def setup_logging(logfile: Path | None, debug: bool = False) -> None:
    log.handlers.clear()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RedactFilter())
        log.addHandler(h)


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make artifacts private
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path} does not exist; run the step that writes it first (make prepare)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; it replaces `final` only if the block completes.

    keep_existing: a shared cache entry (a converted model); if another process finished the same entry
    first, keep that one and discard ours, so a process reading it is never pulled out from under.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if keep_existing:
            with contextlib.suppress(OSError):  # rename fails if `final` appeared meanwhile: theirs wins
                tmp.rename(final)
            return
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- metadata
def git_commit() -> str | None:
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
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
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
        "settings": config.step_settings(cfg, step) if step in config.STEP_KEYS else None,
        **extra,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark), in MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- the run lock
@contextlib.contextmanager
def run_lock(p: paths.RunPaths) -> Iterator[None]:
    """One process per run at a time; the OS drops the lock if the process dies, even with kill -9."""
    p.out.mkdir(parents=True, exist_ok=True)
    fh = open(p.lock, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(f"run '{p.run}' is already running ({holder}); wait for it or stop it first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def sweep_leftovers(p: paths.RunPaths) -> None:
    """Remove temporary files and folders a killed step left behind (we hold the run lock: none is in use)."""
    for d in (p.data, p.out, p.eval):
        if d.is_dir():
            for f in d.iterdir():
                if f.name.startswith(".") and f.name.endswith((".tmp", ".old")):
                    log.info("removing %s (left by an interrupted step)", f)
                    if f.is_dir():
                        shutil.rmtree(f)
                    else:
                        f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- entry point
def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2", help="recipe name (recipes/NAME.yaml) or a YAML path")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="override a recipe setting, e.g. --set train.max_steps=20 (repeatable)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny-model mode: same code path on a tiny random-init model, small data, few steps")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    return ap


def main(step: str, body: Callable[[Context], None], argv: list[str] | None, doc: str | None,
         add_args: Callable[[argparse.ArgumentParser], None] | None = None, lock: bool = True) -> int:
    ap = parser(doc)
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    setup_logging(None, args.debug)
    try:
        cfg = config.load(args.recipe, args.sets, args.tiny)
        rp = paths.RunPaths(cfg.run)
        setup_logging(rp.logs / f"{step}.log", args.debug)
        log.info("[%s] recipe=%s run=%s model=%s", step, cfg.name, cfg.run, cfg.model.name_or_path)
        with run_lock(rp) if lock else contextlib.nullcontext():
            if lock:
                sweep_leftovers(rp)
            body(Context(step, args, cfg, rp))
        return 0
    except (UserError, config.ConfigError) as e:
        if args.debug:
            raise
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
