"""`make push`: the adapter or the merged model, with its model card, to the Hugging Face Hub.

What goes is staged first, as a folder holding exactly the files to upload (card.push: adapter -> adapter/ without
run_info.json, whose host name and paths stay local; merged -> merged/). With --dry-run that folder is
outputs/<run>/push-dry-run/ plus push-dry-run.json (repo, visibility, every file with size and sha256); nothing
leaves the machine. The token is read from HF_TOKEN at upload time and handed to huggingface_hub only: it is never
written to a file, and the run's log redacts it like every secret.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from common.core import io, paths

LOCAL_ONLY = {"run_info.json"}  # host name and absolute paths: provenance that stays on this machine


def source_dir(cfg: Any, rp: paths.RunPaths) -> Path:
    folder = rp.adapter if cfg.card.push == "adapter" else rp.merged
    if not (folder / "README.md").exists():
        raise io.UserError(f"{folder} has no model card; run make eval RECIPE={cfg.name} first (it writes the cards)")
    return folder


def stage(src: Path, dest: Path) -> list[dict]:
    """Copy (hard-link where possible) the files to upload into `dest`; return name, bytes and sha256 of each."""
    files = []
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in LOCAL_ONLY):
        rel = f.relative_to(src)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest / rel)
        except OSError:
            shutil.copy2(f, dest / rel)
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files.append({"path": str(rel), "bytes": f.stat().st_size, "sha256": h.hexdigest()})
    return files


def repo_id(cfg: Any) -> str:
    if not cfg.card.repo_id:
        raise io.UserError(f"card.repo_id is not set; add it to recipes/{cfg.name}.yaml or pass "
                           "ARGS='--set card.repo_id=user/name'")
    return cfg.card.repo_id


def upload(folder: Path, repo: str, private: bool, message: str) -> str:
    """Create the repo if needed and upload `folder`; returns the commit URL."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise io.UserError("HF_TOKEN is not set; put it in .env or the environment (a write token from "
                           "huggingface.co/settings/tokens), or use make push DRY_RUN=1")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=message)
    return str(getattr(info, "commit_url", info))
