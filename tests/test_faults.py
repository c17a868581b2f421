"""Faults: kills at any moment leave nothing Make could take as done; training resumes; a busy run is refused;
two recipes run side by side; reruns are identical; secrets never reach any artifact; missing models and
missing bitsandbytes give one line, not a traceback."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, step

from common.core import paths, run

pytestmark = pytest.mark.e2e  # trains models or runs pipeline steps (make test-fast leaves it out)

HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: kill at the N-th rename, hide a package

TRAIN = ["--recipe", "smollm2", "--tiny", "--set", "train.max_steps=8", "--set", "train.save_steps=2",
         "--set", "train.eval_steps=4", "--set", "runtime.logging_steps=1"]


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
    # a checkpoint cut short while saving (no trainer_state.json yet) must be skipped, not resumed from
    # the newest complete checkpoint (the kill may land while the next one is being written: that one is incomplete)
    last = max((p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()),
               key=lambda p: int(p.name.split("-")[1]))
    before = json.loads((last / "train_seconds.json").read_text())["train_seconds"]  # the killed segment's time
    broken = out / "checkpoints/checkpoint-100"
    shutil.copytree(last, broken)
    (broken / "trainer_state.json").unlink()
    resumed = step("02_sft_qlora", *TRAIN)
    assert "checkpoint-100: incomplete" in resumed.stderr and not broken.exists()
    assert f"resuming from {last}" in resumed.stderr
    info = json.loads((out / "adapter/run_info.json").read_text())
    assert info["global_step"] == 8 and info["resumed_from"]
    assert info["train_seconds"] >= before + info["step_seconds"]  # train time summed over the resumed segments
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


def test_redaction_in_logs(ft_home, monkeypatch):
    secret = "hf_abcdef123456"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert run.redact(f"token is {secret} ok") == "token is *** ok"
    # a secret that reaches a logged value (here pasted as the model name) is masked in the log file and stderr
    p = step("01_prepare", "--recipe", "smollm2", "--tiny", "--set", f"model.name_or_path=org/{secret}", check=False)
    log_text = (ft_home / "outputs/smollm2-tiny/logs/prepare.log").read_text()
    assert "model=org/***" in log_text and secret not in log_text
    assert secret not in p.stderr and "***" in p.stderr


# --------------------------------------------------------------------------- kills outside training
def hooked_env(home, **extra: str) -> dict:
    return dict(os.environ, FT_HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [
        str(HOOKS), os.environ.get("PYTHONPATH")])), **extra)


def kill_at_every_commit(args: list[str], home, target, max_kills: int = 60) -> int:
    """Run `args` again and again, killed (SIGKILL) just before its 1st, 2nd, 3rd ... rename, until a run makes
    it through. After every kill, `target` (the file Make checks) must not exist. Returns the number of kills."""
    for n in range(1, max_kills + 1):
        p = subprocess.run(args, cwd=REPO, env=hooked_env(home, FT_TEST_KILL_AT_RENAME=str(n)), capture_output=True,
                           text=True)
        if p.returncode == 0:
            return n - 1
        assert p.returncode in (-signal.SIGKILL, 2), p.stderr[-3000:]  # 2: a child process was the one killed
        assert not target.exists(), f"{target} exists after a kill at rename {n}"
    raise AssertionError(f"{args} still renaming after {max_kills} kills")


def leftovers(*dirs) -> list:
    return [f for d in dirs if d.is_dir() for f in d.iterdir() if f.name.endswith((".tmp", ".old"))]


def test_kill_at_any_commit_of_install_prepare_merge_eval_leaves_no_target(ft_home):
    py = sys.executable
    flags = ["--recipe", "smollm2", "--tiny"]
    rp = paths.RunPaths("smollm2-tiny")
    kills = {}
    kills["install"] = kill_at_every_commit([py, "scripts/00_install.py"], ft_home, paths.env_json())
    assert json.loads(paths.env_json().read_text())["torch"]
    kills["prepare"] = kill_at_every_commit([py, "scripts/01_prepare.py", *flags], ft_home, rp.prepare_report)
    step("02_sft_qlora", *flags)
    kills["merge"] = kill_at_every_commit([py, "scripts/03_merge_fp16.py", *flags], ft_home, rp.merge_report)
    assert (rp.merged / "config.json").exists()
    kills["eval"] = kill_at_every_commit([py, "scripts/04_eval.py", *flags], ft_home, rp.eval / "metrics.json")
    print("kills before a run got through:", kills)
    assert all(n >= 1 for n in kills.values()), kills  # every step was really cut short at least once
    assert json.loads((rp.eval / "metrics.json").read_text())["n_examples"] == 8
    assert not leftovers(rp.data, rp.out, rp.eval)  # the next run swept what the killed ones left

    # after all those kills the data is byte-identical to an uninterrupted prepare
    other = ft_home / "clean"
    p = subprocess.run([py, "scripts/01_prepare.py", *flags], cwd=REPO, env=dict(os.environ, FT_HOME=str(other)),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("train", "val", "test"):
        assert (other / f"data/processed/smollm2-tiny/{name}.jsonl").read_bytes() == rp.split(name).read_bytes()


# --------------------------------------------------------------------------- models that are not there
@pytest.mark.parametrize("name, fragment", [
    ("/nonexistent/model-dir", "model path /nonexistent/model-dir does not exist"),
    ("nobody/no-such-model", "could not load 'nobody/no-such-model'"),
])
def test_missing_model_is_one_line_and_writes_nothing(ft_home, name, fragment):
    step("01_prepare", "--recipe", "smollm2", "--tiny")
    p = step("02_sft_qlora", "--recipe", "smollm2", "--set", f"model.name_or_path={name}",
             "--set", "model.gguf_file=null", check=False)
    assert p.returncode == 2 and fragment in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (ft_home / "outputs/smollm2/adapter").exists()


def test_4bit_without_bitsandbytes_trains_in_full_precision_and_says_so(ft_home):
    step("01_prepare", "--recipe", "tinyllama", "--tiny")
    p = subprocess.run([sys.executable, "scripts/02_sft_qlora.py", "--recipe", "tinyllama", "--tiny"], cwd=REPO,
                       env=hooked_env(ft_home, FT_TEST_HIDE="bitsandbytes"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "replaced: 4-bit quantization -> full precision: bitsandbytes is not installed" in p.stderr
    info = json.loads((ft_home / "outputs/tinyllama-tiny/adapter/run_info.json").read_text())
    assert info["plan"]["quantization_bits"] == 0
    assert any(n.startswith("4-bit quantization -> full precision") for n in info["plan"]["replaced"])


# --------------------------------------------------------------------------- concurrency, determinism
def test_two_recipes_at_once_then_an_identical_rerun(ft_home, tiny_run, installed):
    installed(ft_home)  # the session's env.json: the two makes install nothing
    env = dict(os.environ, FT_HOME=str(ft_home))
    procs = {r: subprocess.Popen(["make", f"PY={sys.executable}", "all", f"RECIPE={r}", "TINY=1"], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in ("smollm2", "smollm2-xauusd")}
    for r, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{r}:\n{out[-4000:]}"
    # each run wrote only under its own folders
    assert sorted(p.name for p in (ft_home / "outputs").iterdir()) == ["env.json", "smollm2-tiny",
                                                                       "smollm2-xauusd-tiny"]
    assert sorted(p.name for p in (ft_home / "data/processed").iterdir()) == ["smollm2-tiny", "smollm2-xauusd-tiny"]
    for r, task in (("smollm2", "product_description"), ("smollm2-xauusd", "xauusd_forecast")):
        m = json.loads((ft_home / f"outputs/{r}-tiny/eval/metrics.json").read_text())
        assert m["meta"]["recipe"] == r and m["meta"]["task"] == task

    # the same recipe and seed in another root (the session's shared run): byte-identical data, identical losses
    # and metrics
    other = tiny_run("smollm2").home
    a, b = ft_home / "outputs/smollm2-tiny", other / "outputs/smollm2-tiny"
    for name in ("train", "val", "test"):
        assert (ft_home / f"data/processed/smollm2-tiny/{name}.jsonl").read_bytes() == \
            (other / f"data/processed/smollm2-tiny/{name}.jsonl").read_bytes()
    assert losses(a) == losses(b)
    ma, mb = (json.loads((x / "eval/metrics.json").read_text()) for x in (a, b))
    assert ma["base"] == mb["base"] and ma["tuned"] == mb["tuned"] and ma["comparison"] == mb["comparison"]
    assert (a / "eval/side_by_side.csv").read_bytes() == (b / "eval/side_by_side.csv").read_bytes()
