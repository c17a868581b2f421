"""Upload the adapter or the merged model, with its model card, to the Hugging Face Hub (optional).

    make push RECIPE=smollm2 ARGS="--set card.repo_id=me/smollm2-products"           # needs HF_TOKEN
    make push RECIPE=smollm2 DRY_RUN=1                 # or: python scripts/08_push.py --recipe smollm2 --dry-run

card.push picks adapter (default) or merged; card.private (default true) the visibility. --dry-run writes exactly
what would be uploaded to outputs/<run>/push-dry-run/ and push-dry-run.json (repo, files, sizes, sha256) and
uploads nothing. The token comes from HF_TOKEN and is never written anywhere (common/shipping/hub.py).
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from common.core import io, metadata, run
from common.shipping import hub

log = logging.getLogger("ft")


def body(ctx: run.Context) -> None:
    cfg, rp = ctx.cfg, ctx.paths
    src = hub.source_dir(cfg, rp)
    repo = cfg.card.repo_id or f"<card.repo_id>/{cfg.run}"
    message = f"{cfg.card.push} of recipe {cfg.name} ({metadata.git_commit()})"
    if ctx.args.dry_run:
        with io.atomic_dir(rp.push_preview) as tmp:
            files = hub.stage(src, tmp)
        io.atomic_write_json(rp.out / "push-dry-run.json", {
            "repo_id": repo, "private": cfg.card.private, "what": cfg.card.push, "source": str(src),
            "commit_message": message, "files": files, "total_bytes": sum(f["bytes"] for f in files)})
        log.info("dry run: %d files (%.1f MB) would go to %s -> %s", len(files),
                 sum(f["bytes"] for f in files) / 1e6, repo, rp.push_preview)
        return
    repo = hub.repo_id(cfg)
    with tempfile.TemporaryDirectory(prefix="push-", dir=rp.out) as tmp:
        files = hub.stage(src, Path(tmp))
        url = hub.upload(Path(tmp), repo, cfg.card.private, message)
    log.info("pushed %d files of %s to %s (%s)", len(files), src, repo, url)


def main(argv: list[str] | None = None) -> int:
    return run.main("push", body, argv, __doc__, add_args=lambda ap: ap.add_argument(
        "--dry-run", action="store_true", help="write what would be uploaded; upload nothing"))


if __name__ == "__main__":
    sys.exit(main())
