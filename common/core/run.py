"""What every step script shares: command line, logging (with secrets redacted), errors, the run lock, sweeping.

A step's `main(argv=None)` calls `run.main(step, body, argv, doc)`; it parses the common flags
(--recipe, --set, --tiny, --debug), loads the recipe, logs to the console and to outputs/<run>/logs/<step>.log,
holds the run's lock, and turns a failure into one line on stderr: exit code 2 for a problem the user can fix
(UserError, ConfigError), exit code 1 for an unexpected one (its traceback goes to the step's log file; on the
console only with --debug). It returns the exit code instead of exiting, so it is safe to call in a notebook cell.
Files are written with common.core.io; artifacts describe themselves with common.core.metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from common.core import config, dist, paths
from common.core.io import UserError

log = logging.getLogger("ft")


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


def setup_logging(logfile: Path | None, debug: bool = False, rank: int = 0) -> None:
    """Console (and the step's log file); a process other than rank 0 of a multi-process run logs warnings only,
    marked with its rank, and writes no log file."""
    log.handlers.clear()
    log.setLevel(logging.DEBUG if debug else logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s {f'[rank {rank}] ' if rank else ''}%(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RedactFilter())
        log.addHandler(h)


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
def check_own_code() -> None:
    """A script run as a file must import this checkout's `common`, not another clone's editable install."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script and script.suffix == ".py" and script.parent.name == "scripts" and \
            (script.parents[1] / "common").is_dir() and script.parents[1] != paths.REPO:
        raise UserError(f"{script} is in {script.parents[1]} but Python imported common from {paths.REPO} (another "
                        f"clone's editable install); run it through make, or `python -m scripts.{script.stem}` from "
                        f"{script.parents[1]}, or re-point the install: make install")
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
    rp = None
    try:
        check_own_code()
        cfg = config.load(args.recipe, args.sets, args.tiny)
        rp = paths.RunPaths(cfg.run)
        main_process = dist.is_main()  # of a multi-process run (make train NPROC=N): only rank 0 logs to the file
        setup_logging(rp.logs / f"{step}.log" if main_process else None, args.debug, dist.rank())
        log.info("[%s] recipe=%s run=%s model=%s", step, cfg.name, cfg.run, cfg.model.name_or_path)
        with run_lock(rp) if lock and main_process else contextlib.nullcontext():
            if lock and main_process:
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
    except Exception as e:  # a bug or an environment problem: one line here, the traceback in the log file
        if args.debug:
            raise
        for h in log.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "unexpected error", (), sys.exc_info()))
        where = f"; traceback in {rp.logs / (step + '.log')}" if rp else ""
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(e).__name__}: {redact(first)} (unexpected{where}; --debug shows it here)",
              file=sys.stderr)
        return 1
