"""Files that are either whole or absent: atomic writes of text, JSON, JSON lines and folders; `UserError`.

Every artifact is written under a temporary name next to its final place and renamed into place only when it
is complete, so a step killed at any moment leaves nothing that Make (or the next step) could take as done.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A failure the user can fix (bad file, bad setting); printed as one line without a traceback."""


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


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


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
