"""More than one process (make train NPROC=N): on the CPU with gloo, 2 processes train the tiny recipe to the same
loss curve as 1 and write the same files; a kill -9 of the launcher leaves no rank behind and a rerun resumes
(with another process count); the engine configurations load with accelerate's own reader, and launches that
cannot work stop with one line before any process starts. DDP is the one engine offered (common/core/dist.py)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, make

from common.core import config, dist
from common.core.io import UserError

pytestmark = pytest.mark.e2e  # trains models or runs pipeline steps (make test-fast leaves it out)

RUN = "outputs/tinyllama-tiny"
SETS = ("--set lora.dropout=0 --set train.learning_rate=0.005 --set train.batch_size=2 --set train.grad_accum=4")


def curve(home: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((home / RUN / "train_log.csv").open())
    return [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]


def files(home: Path) -> set[str]:
    out = home / RUN
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoint-" not in str(p)}


def test_two_processes_train_the_same_curve_and_write_the_same_files(ft_home, tmp_path, installed):
    one = installed(tmp_path / "one")  # the session's env.json in both roots: make installs nothing
    installed(ft_home)
    make(one, "train", "RECIPE=tinyllama", "TINY=1", f"ARGS={SETS}")
    p = make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "NPROC=2", f"ARGS={SETS}")
    assert "accelerate.commands.launch" in p.stdout and "--num_processes 2" in p.stdout
    a, b = curve(one), curve(ft_home)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4] and a[-1][1] < a[0][1] - 0.1, a
    for (s, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-4), (s, x, y)
    assert files(ft_home) == files(one), files(ft_home) ^ files(one)
    info = json.loads((ft_home / RUN / "adapter/run_info.json").read_text())
    assert info["distributed"] == {"engine": "ddp", "world_size": 2}
    # the same examples trained: every process's tokens summed, not rank 0's times the processes
    assert info["trained_tokens"] == json.loads((one / RUN / "adapter/run_info.json").read_text())["trained_tokens"]
    b = info["plan"]["batching"]
    assert (b["effective"], b["processes"], b["micro_batch"] * b["grad_accum"] * b["processes"]) == (8, 2, 8), b
    log = (ft_home / RUN / "logs/train.log").read_text()
    assert "engine ddp, world size 2" in log and "[rank 1]" not in log  # rank 0 alone writes the log file
    assert "[rank 1]" in p.stderr  # the other rank's warnings reach the console, marked


def ranks_of(home: Path) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "02_sft_qlora.py" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("FT_HOME") == str(home):
                out.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_kill_9_of_the_launcher_leaves_no_rank_and_a_rerun_resumes_with_another_process_count(ft_home, installed):
    installed(ft_home)
    sets = f"{SETS} --set train.max_steps=8 --set train.save_steps=2 --set train.eval_steps=2"
    make(ft_home, "prepare", "RECIPE=tinyllama", "TINY=1", f"ARGS={sets}")
    launch = dist.launch_command(2)
    env = dict(os.environ, FT_HOME=str(ft_home), PYTHONPATH=str(REPO), MASTER_PORT="29513")
    proc = subprocess.Popen([*launch, "scripts/02_sft_qlora.py", "--recipe", "tinyllama", "--tiny", *sets.split()],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = ft_home / RUN / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the ranks die with their launcher (PR_SET_PDEATHSIG)
        if not ranks_of(ft_home):
            break
        time.sleep(0.1)
    assert not ranks_of(ft_home), "a rank outlived its launcher"
    assert not (ft_home / RUN / "adapter").exists()
    done = sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json"))
    assert done and done[-1] < 8
    make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", f"ARGS={sets}")  # one process resumes two's checkpoint
    info = json.loads((ft_home / RUN / "adapter/run_info.json").read_text())
    assert info["resumed_from"] and info["resumed_from"].endswith(f"checkpoint-{done[-1]}"), info["resumed_from"]
    assert info["global_step"] == 8 and info["steps_this_process"] == 8 - done[-1]
    assert info["distributed"]["world_size"] == 1


def test_the_shipped_ddp_config_loads_with_accelerates_reader():
    c = dist.load_engine_config()
    assert str(c.distributed_type).endswith("MULTI_GPU") and c.mixed_precision == "no" and c.num_machines == 1


@pytest.mark.parametrize("recipe,nproc,gpus,fragment", [
    ("tinyllama", 3, 0, "effective batch train.batch_size x train.grad_accum = 16 does not split over NPROC=3"),
    ("tinyllama", 4, 2, "NPROC=4 but this machine has 2 GPU(s)"),
    ("tinyllama", 0, 0, "NPROC must be a number >= 1"),
])
def test_launches_that_cannot_work_fail_with_one_line(recipe, nproc, gpus, fragment):
    with pytest.raises(UserError) as e:
        dist.check(config.load(recipe), nproc, gpus)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_bad_nproc_or_a_dist_setting_stops_make_before_any_step(ft_home):
    p = make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "NPROC=3", check=False)
    assert p.returncode == 2 and "does not split over NPROC=3 processes" in p.stderr and "01_prepare" not in p.stdout
    p = make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "NPROC=two", check=False)
    assert p.returncode == 2 and "NPROC must be a number >= 1, got 'two'" in p.stderr
    p = make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "NPROC=2", "DIST=fsdp", check=False)
    assert p.returncode == 2 and "DIST is gone" in p.stderr and "01_prepare" not in p.stdout


def test_precomputed_reference_log_probs_need_one_process():
    """TRL keeps precomputed reference log-probs in a temp file of its own process: NPROC > 1 is refused in one line."""
    cfg = config.load("smollm2-dpo", ["train.precompute_ref=true"])
    dist.check(cfg, 1, 0)
    with pytest.raises(UserError, match="train.precompute_ref needs one process"):
        dist.check(cfg, 2, 0)
