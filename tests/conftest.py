"""Shared fixtures: a temporary artifact root per test, one model cache per session, helpers to run steps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Converted SmolLM2 and tiny models, shared by the session (FT_CACHE from the environment wins)."""
    return Path(os.environ.get("FT_CACHE") or tmp_path_factory.mktemp("model-cache"))


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
    return run_cmd([sys.executable, f"scripts/{script}.py", *args], check=check)


def make(home: Path, *args: str, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FT_HOME=str(home), PYTHONUNBUFFERED="1", **env_extra)
    p = subprocess.run(["make", f"PY={sys.executable}", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def ran_steps(p: subprocess.CompletedProcess) -> list[str]:
    return [s for s in ("00_install", "01_prepare", "02_sft_qlora", "03_merge_fp16", "04_eval")
            if f"scripts/{s}.py" in p.stdout]
