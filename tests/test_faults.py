"""Faults: kill -9 during training resumes; a busy run is refused; secrets never reach any artifact."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

from common import paths, run
from conftest import REPO, step

TRAIN = ["--recipe", "smollm2", "--tiny", "--set", "train.max_steps=8", "--set", "train.save_steps=2",
         "--set", "train.eval_steps=4", "--set", "train.logging_steps=1"]


def losses(out):
    return {int(r["step"]): float(r["loss"]) for r in csv.DictReader((out / "train_log.csv").open()) if r["loss"]}


def test_kill9_during_training_resumes_and_matches_uninterrupted(ft_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_TESTSECRET_never_written")
    step("01_prepare", "--recipe", "smollm2", "--tiny")
    out = ft_home / "outputs/smollm2-tiny"
    env = dict(os.environ, FT_HOME=str(ft_home))
    proc = subprocess.Popen([sys.executable, "scripts/02_sft_qlora.py", *TRAIN], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints/checkpoint-4/trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint appeared"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter/run_info.json").exists()  # nothing Make could take as finished
    resumed = step("02_sft_qlora", *TRAIN)
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    info = json.loads((out / "adapter/run_info.json").read_text())
    assert info["global_step"] == 8 and info["resumed_from"]
    interrupted = losses(out)

    # the same training uninterrupted, in a second root
    other = ft_home / "again"
    env2 = dict(env, FT_HOME=str(other))
    for script in ("01_prepare", "02_sft_qlora"):
        p = subprocess.run([sys.executable, f"scripts/{script}.py", *(TRAIN if script != "01_prepare" else
                            ["--recipe", "smollm2", "--tiny"])], cwd=REPO, env=env2, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    straight = losses(other / "outputs/smollm2-tiny")
    assert (other / "data/processed/smollm2-tiny/train.jsonl").read_bytes() == \
        (ft_home / "data/processed/smollm2-tiny/train.jsonl").read_bytes()
    late = [s for s in straight if s > 4]
    assert late and all(abs(straight[s] - interrupted[s]) < 1e-3 for s in late), (straight, interrupted)
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) <= 2  # recipe's save_total_limit

    # the token appears in no file the run wrote
    for f in ft_home.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert b"hf_TESTSECRET_never_written" not in f.read_bytes(), f


def test_same_run_twice_is_refused(ft_home):
    with run.run_lock(paths.RunPaths("smollm2")):
        p = step("01_prepare", "--recipe", "smollm2", check=False)
    assert p.returncode == 2 and "already running" in p.stderr
    assert not (ft_home / "data/processed/smollm2/prepare_report.json").exists()


def test_redaction_in_logs(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    assert run.redact("token is hf_abcdef123456 ok") == "token is *** ok"
