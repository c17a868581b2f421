"""Make's view of a run: which settings each step depends on (per-step stamps) and the run's paths as variables.

    python -m common.core.stamps --recipe NAME [--tiny] [--set k=v ...] [--write]

validates the recipe and prints the run's paths as Make variables (KEY=path lines, TRAIN_SCRIPT: the training step
of the recipe's task, and ENV_STALE=1 when outputs/env.json describes another Python), or one line `error: ...`;
with --write it also writes one small JSON per step into the run's .stamps/ folder, rewriting a file only when
its content changed, so Make re-runs exactly the steps whose settings changed. The `runtime` section is in no
stamp: changing how a run executes never re-runs a step.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from common import tasks
from common.core import config, paths

# Which settings each step depends on (Make re-runs a step when its stamp changes; training's stamp is also the
# key that decides whether an interrupted run's checkpoints still apply).
STEP_KEYS = {
    "prepare": ["task", "data", "prompt", "model.name_or_path", "model.gguf_file", "model.family", "model.arch",
                "tiny", "train.max_length", "train.max_target_length"],
    "train": ["model", "quantization", "lora", "train", "eval.baseline_samples", "tiny"],
    "merge": ["merge", "model.full_precision_name_or_path"],
    "eval": ["eval", "card.base_model", "card.license", "card.tags"],
    "export": ["export", "card.license"],
}


# What a step writes, by format: bumped when a step's outputs change shape, so Make re-runs it for runs made by an
# older version (eval 2: verdicts against the baselines, the forgetting check; eval 3: the strongest baseline chosen
# on val, the headline against the strongest alternative, "too few examples to tell"; eval 4: the tuned model's
# val scores, eval/val_scores.csv, which make sweep chooses on; eval 5: preference accuracy for a task with pairs, the
# measured peak against make plan's).
FORMATS = {"eval": 5}


# The script that trains each kind of task (a task's `trains`): the Makefile's train rule runs it.
TRAIN_SCRIPTS = {"sft": "scripts/02_sft_qlora.py", "preference": "scripts/02_preference.py"}


def train_script(cfg: config.Config) -> str:
    return TRAIN_SCRIPTS[getattr(tasks.get(cfg.task), "trains", "sft")]


def step_settings(cfg: config.Config, step: str) -> dict:
    out = {}
    for key in STEP_KEYS[step]:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = node
    if step == "prepare":
        out["data_file"] = data_fingerprint(cfg.data.path)
        if cfg.data.replay:
            out["replay_file"] = data_fingerprint(str(paths.REPLAY_TEXT))
    return out


def data_fingerprint(setting: str | None) -> list | None:
    """What prepare read, as Make sees a prerequisite: each local data file's size and modification time (a folder's
    files, sorted), so editing the data file re-runs prepare and what follows; None for a hub id."""
    path = paths.data_source(setting)
    if path is None:
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def write(cfg: config.Config) -> Path:
    d = paths.RunPaths(cfg.run).stamps
    d.mkdir(parents=True, exist_ok=True)
    for step in STEP_KEYS:
        f = d / f"{step}.json"
        stamp = {**step_settings(cfg, step), **({"format": FORMATS[step]} if step in FORMATS else {})}
        text = json.dumps(stamp, indent=1, sort_keys=True, default=str)
        if not f.exists() or f.read_text() != text:
            f.write_text(text)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = config.recipe_parser("Validate a recipe, print its paths as Make variables, write stamps.")
    ap.add_argument("--write", action="store_true", help="write the per-step stamps Make depends on")
    args, _ = ap.parse_known_args(argv)
    try:
        cfg = config.load(args.recipe, args.sets, args.tiny)
        if args.write:
            write(cfg)
        lines = [f"{key}={path}" for key, path in paths.RunPaths(cfg.run).targets().items()]
        lines.append(f"TRAIN_SCRIPT={train_script(cfg)}")
    except (config.ConfigError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print("\n".join(lines))
    print(f"ENV_STALE={int(env_elsewhere())}")
    return 0


# Installed by `make install` in every environment it ran in (a venv deleted and made again at the same path lacks them)
INSTALLED_MARKERS = ("torch", "transformers", "peft", "trl")


def env_elsewhere() -> bool:
    """Whether outputs/env.json describes another Python than this one: written by another (its `prefix`), or this
    one lacks what it installed. Make installs again, so a new venv is never taken for an installed one."""
    try:
        recorded = json.loads(paths.env_json().read_text()).get("prefix")
    except (OSError, ValueError, AttributeError):
        return False
    if recorded is None:
        return False
    return (Path(recorded).resolve() != Path(sys.prefix).resolve()
            or any(importlib.util.find_spec(m) is None for m in INSTALLED_MARKERS))


if __name__ == "__main__":
    sys.exit(main())
