"""Every path of the project, in one place.

The artifact root defaults to the repository and moves with the FT_HOME environment variable (or FT_HOME in
.env), for example to a mounted Google Drive folder, without any code change. Under it:

    data/processed/<run>/      train/val/test.jsonl, prepare_report.json      (01_prepare)
    outputs/<run>/adapter/     LoRA adapter + tokenizer + run_info.json       (02_sft_qlora)
    outputs/<run>/merged/      merged fp16 model                              (03_merge_fp16)
    outputs/<run>/eval/        metrics.json, side_by_side.csv, report.md ...  (04_eval)
    outputs/<run>/export/      <name>-f16.gguf, <name>-q8_0.gguf, Modelfile,  (06_export)
                               export_report.json
    outputs/<run>/push-dry-run/ what make push would upload                   (08_push --dry-run)
    outputs/<run>/plan.json    predicted memory and time; merge/export RAM and disk (make plan)
    outputs/summary.csv, outputs/report.html   every run on one page          (07_report)
    outputs/<run>/tensorboard/ event files when runtime.report_to has tensorboard (02_sft_qlora)
    outputs/env.json           what 00_install found                          (00_install)
    outputs/sweeps/<name>/     sweep.md, sweep.csv, sweep.json, sweep.log     (make sweep)
    outputs/bench/<run>.json   speed benchmark results and tables (.md)       (bench)
    outputs/gpu-check/         <date>-<gpu>.json and .md, logs/, work/         (gpu_check)
    outputs/.cache/            converted GGUF models, tiny models, wheels/ (llama.cpp built once;
                               FT_CACHE moves the cache)

<run> is the recipe name, with "-tiny" appended in tiny-model mode ("-full" for the random-init stand-in at the
real model's shape, SHAPE=full), or the recipe's run_name (make sweep names one run per combination). Raw data
(data/sample, your trn.json) is only ever read.

`python -m common.core.stamps --recipe NAME [--tiny]` prints a run's paths as Make variables (the Makefile uses it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO / "recipes"
MODEL_CONFIGS_DIR = REPO / "common" / "model" / "model_configs"  # real models' configurations (SHAPE=full stand-ins)
DDP_CONFIG = REPO / "common" / "core" / "ddp.yaml"  # accelerate's configuration for make train NPROC=N
GENERAL_TEXT = REPO / "data" / "general" / "passages.txt"  # the forgetting check's passages (shipped, read only)
REPLAY_TEXT = REPO / "data" / "general" / "replay.txt"  # data.replay's general English, never the passages above
ENV_FILE = REPO / ".env"


@cache
def load_dotenv_once() -> None:
    """Read .env (if any) into os.environ without overriding what the shell already set."""
    if ENV_FILE.exists():
        from dotenv import load_dotenv

        load_dotenv(ENV_FILE, override=False)


def data_source(setting: str | None) -> Path | None:
    """data.path as a local file or folder (relative paths are tried against the repository first), or None for a
    hub id or a path that does not exist."""
    if not setting or str(setting).startswith("hub:"):
        return None
    path = Path(setting).expanduser()
    if not path.is_absolute():
        path = (REPO / path) if (REPO / path).exists() else path.resolve()
    return path if path.exists() else None


def home() -> Path:
    """The artifact root: FT_HOME if set (shell or .env), else the repository."""
    load_dotenv_once()
    root = Path(os.environ.get("FT_HOME") or REPO).expanduser().resolve()
    if " " in str(root):
        raise ValueError(f"FT_HOME={root!s} contains a space, which Make cannot handle; choose a path without spaces")
    if root == Path(root.anchor):
        raise ValueError(f"FT_HOME={root!s} is the filesystem root, which make clean-all would empty; choose a folder")
    return root


def env_json() -> Path:
    return home() / "outputs" / "env.json"


def bench_dir() -> Path:
    """`make bench` results: <run>.json and <run>.md."""
    return home() / "outputs" / "bench"


def gpu_check_dir() -> Path:
    """`make gpu-check` reports (<date>-<gpu>.json, .md), each part's log and artifact root (logs/, work/)."""
    return home() / "outputs" / "gpu-check"


# What scripts/gpu_carry.py gathers for the offline GPU machine (wheels, tokenizer files; git-ignored).
CARRY_DIR = REPO / ".gpu"


def summary_csv() -> Path:
    """make report: one row per run under the artifact root (and report.html beside it)."""
    return home() / "outputs" / "summary.csv"


def report_html() -> Path:
    return home() / "outputs" / "report.html"


def cache_dir() -> Path:
    return home() / "outputs" / ".cache"


def cache_root() -> Path:
    """Converted and tiny models, llama.cpp's built wheel; FT_CACHE moves it (tests share one across temporary
    artifact roots; on Colab a Drive folder keeps what took minutes to make)."""
    return Path(os.environ.get("FT_CACHE") or cache_dir())


def wheel_cache() -> Path:
    """Wheels this project built from source (llama-cpp-python): built once, installed from here afterwards."""
    return cache_root() / "wheels"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def run_name(recipe: str, tiny: bool = False, shape: str = "tiny") -> str:
    """recipe, recipe-tiny (tiny stand-in) or recipe-full (random-init stand-in at the real model's shape); the
    recipe's `run_name` replaces it (make sweep: sweep_run_name)."""
    return f"{recipe}-{shape}" if tiny else recipe


RESERVED = ("sweeps", "bench", "gpu-check")  # folders under outputs/ that are not runs
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def valid_run_name(name: str) -> bool:
    """A name Make and every file system take as one path part, and not a folder outputs/ holds for other uses."""
    return bool(_RUN_NAME.fullmatch(name)) and name not in RESERVED


def sweep_run_name(base: str, setting: list[tuple[str, str]]) -> str:
    """One sweep combination's run: the base run and each swept key's last part and value, e.g.
    smollm2--learning_rate-2e-4--r-8 (characters a run name cannot hold become '_')."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{re.sub(r'[^A-Za-z0-9.-]+', '_', text).strip('_')}" for key, text in setting]
    return "--".join([base, *parts])


def sweep_dir(name: str) -> Path:
    """make sweep's report: sweep.md, sweep.csv, sweep.json and sweep.log."""
    return home() / "outputs" / "sweeps" / name


@dataclass(frozen=True)
class RunPaths:
    """Where one run (recipe, tiny or not) reads and writes."""

    run: str

    @property
    def data(self) -> Path:
        return home() / "data" / "processed" / self.run

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    @property
    def prepare_report(self) -> Path:
        return self.data / "prepare_report.json"

    @property
    def out(self) -> Path:
        return home() / "outputs" / self.run

    @property
    def adapter(self) -> Path:
        return self.out / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (runtime.report_to: tensorboard)."""
        return self.out / "tensorboard"

    @property
    def merged(self) -> Path:
        return self.out / "merged"

    @property
    def merge_report(self) -> Path:
        return self.out / "merge_report.json"

    @property
    def export(self) -> Path:
        """GGUF files, Modelfile and export_report.json (06_export)."""
        return self.out / "export"

    @property
    def export_report(self) -> Path:
        return self.export / "export_report.json"

    @property
    def push_preview(self) -> Path:
        """make push ARGS=--dry-run: exactly the files that would be uploaded, and manifest.json."""
        return self.out / "push-dry-run"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def base_cache(self) -> Path:
        """Base-model generations, kept outside eval/ so re-running eval after more training reuses them."""
        return self.out / "base_generations.jsonl"

    @property
    def tuned_cache(self) -> Path:
        """Tuned-model generations, keyed by the tuned weights: a card-only change re-runs eval without generating."""
        return self.out / "tuned_generations.jsonl"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def stamps(self) -> Path:
        return self.out / ".stamps"

    @property
    def plan(self) -> Path:
        """make plan: predicted peak memory and time per step (scripts/plan.py)."""
        return self.out / "plan.json"

    @property
    def lock(self) -> Path:
        return self.out / ".lock"

    # The file each step writes last: the Makefile's targets.
    def targets(self) -> dict[str, Path]:
        return {
            "HOME_DIR": home(),
            "ENV_JSON": env_json(),
            "DATA_DIR": self.data,
            "OUT_DIR": self.out,
            "PREPARED": self.prepare_report,
            "TRAINED": self.adapter / "run_info.json",
            "MERGED": self.merge_report,
            "EVALUATED": self.eval / "metrics.json",
            "EXPORTED": self.export_report,
            "STAMPS": self.stamps,
        }
