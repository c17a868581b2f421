"""Shared fixtures: a temporary artifact root per test, one model cache per session, tiny runs built once per session,
helpers to run steps (only from tests marked e2e, slow or gpu: `make test-fast` must train nothing)."""
from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two xdist workers on a 2-core machine: with two OpenMP threads each, a worker's threads wait on the other's (a real
# SmolLM2 step measured 34-140 s against 8-16 s at one thread, same machine and load); so each worker, and every
# process it starts, uses one thread unless OMP_NUM_THREADS says otherwise. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest groups first (minutes on the 2-core CPU machine), so that no long one starts last on one worker while
# the other has nothing left; xdist would otherwise start the groups with the most tests first, these last.
LONGEST_FIRST = ("tiny-runs", "tests/test_smollm2_real.py", "tests/test_faults.py", "tests/test_recipes.py",
                 "tests/test_sweep.py", "tests/test_gate.py", "tests/test_training.py", "tests/test_dist.py",
                 "tests/test_notebook.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order given below
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs on two workers (pytest-xdist, --dist loadgroup): every test that uses a shared tiny run goes to
    one worker, which builds each run once; the other tests of a file stay together on one worker. The longest
    groups are handed out first (LONGEST_FIRST), the rest in file order."""
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    groups = {}
    for item in items:
        groups[item] = "tiny-runs" if "tiny_run" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda it: rank.get(groups[it], len(rank)))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted SmolLM2, tiny models and llama.cpp's vocabularies, shared by the session and by its xdist workers
    (one folder next to theirs: every entry is written with io.atomic_dir(keep_existing=True), so the first worker
    to finish one serves both); FT_CACHE from the environment wins."""
    if os.environ.get("FT_CACHE"):
        return Path(os.environ["FT_CACHE"])
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base temp is a folder of the run's own
        shared = tmp_path_factory.getbasetemp().parent / "model-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def llama_vocab(model_cache) -> Path:
    """The folder of llama.cpp's Llama-3 (llama-bpe) and SentencePiece (llama-spm) vocabulary files and reference
    tokenizations, fetched once into the session's model cache (common/model/standins.py: the llama-cpp-python sdist, or
    FT_VOCAB_DIR), where the tiny runs' subprocesses find them too."""
    from common.model import standins

    with _cache_env(model_cache):
        return standins.vocab_dir()


@pytest.fixture(scope="session")
def llama_tokenizers(model_cache, llama_vocab) -> dict[str, Path]:
    """Those vocabularies as Hugging Face tokenizer folders (llama-bpe, llama-spm), converted once."""
    from common.model import standins

    with _cache_env(model_cache):
        return {name: standins.llama_tokenizer_dir(name) for name in standins.VOCAB_FILES}


@contextlib.contextmanager
def _cache_env(model_cache: Path):
    before = os.environ.get("FT_CACHE")
    os.environ["FT_CACHE"] = str(model_cache)
    try:
        yield
    finally:
        if before is None:
            del os.environ["FT_CACHE"]
        else:
            os.environ["FT_CACHE"] = before


@pytest.fixture
def ft_home(tmp_path, model_cache, monkeypatch) -> Path:
    """A fresh artifact root (FT_HOME) for this test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FT_HOME", str(home))
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    monkeypatch.delenv("DATA_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


_CURRENT: list = []  # the test being set up or run


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT[:] = [item]


def _require_tier(what: str) -> None:
    """A pipeline step or `make` runs only from a test marked e2e, slow or gpu (or from a fixture it uses)."""
    item = _CURRENT[0] if _CURRENT else None
    if item is not None and not any(item.get_closest_marker(m) for m in ("e2e", "slow", "gpu")):
        raise AssertionError(f"{item.nodeid} runs {what}: mark it @pytest.mark.e2e (make test-fast leaves those out)")


def run_cmd(args: list[str], env_home: Path | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_home is not None:
        env["FT_HOME"] = str(env_home)
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n"
                             f"{p.stderr[-5000:]}")
    return p


def step(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if script != "01_prepare":  # preparing data trains nothing and takes seconds
        _require_tier(f"scripts/{script}.py")
    return run_cmd([sys.executable, f"scripts/{script}.py", *args], check=check)


def make(home: Path, *args: str, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    _require_tier(f"make {' '.join(args)}")
    env = dict(os.environ, FT_HOME=str(home), PYTHONUNBUFFERED="1", **env_extra)
    p = subprocess.run(["make", f"PY={sys.executable}", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of trained positions (label != IGNORE), as (start, end)."""
    from common.data.prompts import IGNORE

    spans, start = [], None
    for i, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def ran_steps(p: subprocess.CompletedProcess) -> list[str]:
    return [s for s in ("00_install", "01_prepare", "02_sft_qlora", "03_merge_fp16", "04_eval")
            if f"scripts/{s}.py" in p.stdout]


@dataclass
class TinyRun:
    """A tiny run built once per session: `make all`, then `make export` unless the test asked for none (its result
    kept, a refusal included)."""

    recipe: str
    home: Path
    export: subprocess.CompletedProcess | None = None

    @property
    def out(self) -> Path:
        return self.home / "outputs" / f"{self.recipe}-tiny"

    @property
    def data(self) -> Path:
        return self.home / "data" / "processed" / f"{self.recipe}-tiny"

    def copy(self, dest: Path) -> Path:
        """A copy of the run's artifact root (times kept, so Make sees every step up to date), for a test that
        changes it."""
        shutil.copytree(self.home, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def installed(tmp_path_factory, model_cache):
    """installed(home): gives a fresh artifact root the outputs/env.json of one `make install` per session, so its
    `make` skips the install step (about 13 s of pip and probe each) where installing is not what the test checks
    (tests/test_bootstrap.py and tests/test_faults.py install for real)."""
    made: list[Path] = []

    def give(home: Path) -> Path:
        if not made:
            first = tmp_path_factory.mktemp("installed") / "home"
            first.mkdir()
            make(first, "install", FT_CACHE=str(model_cache), HF_HUB_OFFLINE="1")
            made.append(first / "outputs" / "env.json")
        (home / "outputs").mkdir(parents=True, exist_ok=True)
        shutil.copy(made[0], home / "outputs" / "env.json")  # a new mtime: newer than requirements.txt
        return home

    return give


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, model_cache, installed):
    """tiny_run(recipe) -> TinyRun, built on first use in its own artifact root and shared by every test after it
    (`export=False`: no `make export` yet, for a test that does not look at it); a test that changes a run works on
    run.copy(tmp_path / "home")."""
    runs: dict[str, TinyRun] = {}
    env = {"FT_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}

    def get(recipe: str, export: bool = True) -> TinyRun:
        if recipe not in runs:
            home = installed(tmp_path_factory.mktemp(f"run-{recipe}") / "home")
            make(home, "all", f"RECIPE={recipe}", "TINY=1", **env)
            runs[recipe] = TinyRun(recipe, home)
        run = runs[recipe]
        if export and run.export is None:
            run.export = make(run.home, "export", f"RECIPE={recipe}", "TINY=1", check=False, **env)
        return run

    return get


def write(path: Path, rows: list, gz: bool = False) -> Path:
    """A test data file: JSON lines (.jsonl), a JSON array (.json), CSV (.csv) or Parquet (.parquet) by suffix; gzip when gz."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        data = path.read_bytes()
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        data = path.read_bytes()
    elif path.suffix == ".json":
        data = json.dumps(rows).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path
