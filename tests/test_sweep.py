"""make sweep: a grid expands into named runs, each loaded like a recipe; a bad grid stops in one line before anything
trains; the report pairs each run with the sweep's best run on the same examples, marks ties and recommends the
least-forgetting (then cheapest) tie, figures read back from the runs' own files; end to end, a 2x2 tiny sweep
killed mid-run finishes only its missing runs and a third `make sweep` makes nothing."""
from __future__ import annotations

import csv
import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make

from common.core import config, io, paths, sweep
from common.evaluation import metrics, sweep_report
from common.shipping import report

GRID = "train.learning_rate=1e-3,2e-3 lora.r=4,8"


def test_grid_expands_into_named_runs_each_loaded_as_a_recipe(ft_home):
    p = sweep.plan("smollm2", ["train.max_steps=3"], True, GRID, force=False)
    assert p.describe() == ("sweep smollm2-tiny: train.learning_rate in 1e-3, 2e-3; lora.r in 4, 8 -> 2 x 2 = 4 runs")
    assert [r.name for r in p.runs] == ["smollm2-tiny--learning_rate-1e-3--r-4", "smollm2-tiny--learning_rate-1e-3--r-8",
                                        "smollm2-tiny--learning_rate-2e-3--r-4", "smollm2-tiny--learning_rate-2e-3--r-8"]
    for r in p.runs:
        cfg = p.cfgs[r.name]
        assert cfg.run == r.name and paths.RunPaths(cfg.run).out == ft_home / "outputs" / r.name
        assert (cfg.train.learning_rate, cfg.lora.r) == (float(r.setting[0][1]), int(r.setting[1][1]))
        assert cfg.train.max_steps == 3  # the base flags hold for every run
    args = sweep.make_command(p, p.runs[0])
    assert "TINY=1" in args and args[-1] == ("ARGS=--set train.max_steps=3 --set train.learning_rate=1e-3 "
                                             "--set lora.r=4 --set run_name=smollm2-tiny--learning_rate-1e-3--r-4")


def test_the_recipes_sweep_section_is_the_grid_without_GRID(ft_home):
    p = sweep.plan("smollm2", [], False, None, force=False)
    assert [k for k, _ in p.grid] == ["train.learning_rate", "lora.r"]
    assert sorted({(c.train.learning_rate, c.lora.r) for c in p.cfgs.values()}) == [
        (5e-4, 8), (5e-4, 16), (1e-3, 8), (1e-3, 16)]


@pytest.mark.parametrize("grid, sets, words", [
    ("train.learnig_rate=1e-3,2e-3", [], ["train.learnig_rate", "unknown key", "learning_rate"]),
    ("lora.r=4,4", [], ["lora.r", "different"]),
    ("lora.r=4,8 lora.r=16", [], ["given twice"]),
    ("run_name=a,b", [], ["sets run names itself"]),
    ("lora.target_modules=[q_proj,v_proj]", [], ["no spaces, quotes or lists"]),
    ("train.batch_size=0,1", [], ["train.batch_size and train.grad_accum must be >= 1"]),
    ("lora.r=1,2,3 train.seed=1,2,3", [], ["9 runs", "sweep.max_runs=8", "FORCE=1"]),
    ("lora.r", [], ["expected key=value"]),
    (None, [], ["nothing to sweep"]),
])
def test_a_bad_grid_stops_in_one_line_before_anything_runs(ft_home, grid, sets, words):
    with pytest.raises(io.UserError) as e:
        sweep.plan("smollm2-xauusd" if grid is None else "smollm2", sets, True, grid, force=False)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (ft_home / "outputs").exists()


def test_force_runs_a_grid_over_the_limit_and_the_limit_is_a_setting(ft_home):
    assert len(sweep.plan("smollm2", [], True, "lora.r=1,2,3 train.seed=1,2,3", force=True).runs) == 9
    assert len(sweep.plan("smollm2", ["sweep.max_runs=9"], True, "lora.r=1,2,3 train.seed=1,2,3", False).runs) == 9


@pytest.mark.parametrize("name", ["a b", "-x", "sweeps", "x/y"])
def test_run_name_must_be_one_safe_path_part(ft_home, name):
    with pytest.raises(config.ConfigError, match="run_name must be"):
        config.load("smollm2", [f"run_name={name}"], tiny=True)


def test_an_exponent_without_a_dot_is_a_number(ft_home):
    assert config.load("smollm2", ["train.learning_rate=2e-4"]).train.learning_rate == 2e-4
    assert config.load("smollm2", ["data.path=1e3"]).data.path == "1e3"  # text stays text


# --------------------------------------------------------------------------- the report, on runs written here
def _fake_run(name: str, scores: list[float], general: list[float], seconds: float, ids: list[str] | None = None):
    """A finished run's files as eval and train write them (only what the sweep report reads)."""
    rp = paths.RunPaths(name)
    ids = ids or [f"t{i}" for i in range(len(scores))]
    base_general = [2.0] * len(general)
    m = {"primary_metric": "rougeL", "n_examples": len(scores), "tuned": {"rougeL": sum(scores) / len(scores)},
         "comparison": {"per_example": "rougeL"}, "strongest_baseline": "retrieval",
         "verdict": {"against": "retrieval", **metrics.paired(scores, [0.3] * len(scores), 200)},
         "forgetting": {"tuned_loss": sum(general) / len(general),
                        **metrics.paired(general, base_general, 200, higher_is_better=False)}}
    io.atomic_write_json(rp.eval / "metrics.json", m)
    io.atomic_write_text(rp.eval / "side_by_side.csv", "id,tuned,tuned_rougeL\n" + "".join(
        f"{i},\"an answer, with a comma\",{s}\n" for i, s in zip(ids, scores)))
    io.write_jsonl(rp.tuned_cache, [{"key": "k"}, {"general_losses": general}])
    io.atomic_write_json(rp.adapter / "run_info.json", {"train_seconds": seconds, "peak_rss_mb": 1000.0})
    return m


def _report(names: list[str]) -> dict:
    return sweep_report.write("s", "a grid", ["lora.r"], {n: {"lora.r": str(i)} for i, n in enumerate(names)}, 500)


def test_report_pairs_each_run_with_the_best_and_recommends_the_least_forgetting_tie(ft_home):
    n = 60
    best = [0.5 + 0.2 * (i % 3) for i in range(n)]
    _fake_run("a", best, [2.5] * 40, 100.0)  # the best mean, forgets most
    tie = [s + (0.02 if i % 2 else -0.03) for i, s in enumerate(best)]
    _fake_run("b", tie, [2.1 + 0.01 * (i % 3) for i in range(40)], 300.0)  # a tie that forgets less (slower)
    _fake_run("c", [s - 0.3 for s in best], [2.0] * 40, 10.0)  # forgets nothing, but clearly worse on the task
    s = _report(["a", "b", "c"])
    assert (s["best"], s["ties"], s["recommended"]) == ("a", ["a", "b"], "b")
    assert "b cannot be told from the best run a" in s["reason"] and "forgets the least" in s["reason"]
    rows = {r["run"]: r for r in s["rows"]}
    b = metrics.paired(tie, best, 500)
    assert (rows["b"]["vs_best"], rows["b"]["vs_best_ci_low"], rows["b"]["vs_best_ci_high"]) == (
        b["mean"], b["ci_low"], b["ci_high"])
    assert rows["c"]["tie"] is False and rows["a"]["vs_best"] == 0.0
    for name, r in rows.items():  # every figure is the run's own
        m = io.read_json(paths.RunPaths(name).eval / "metrics.json")
        assert (r["tuned"], r["verdict"], r["forgetting"], r["forgetting_verdict"]) == (
            m["tuned"]["rougeL"], m["verdict"]["verdict"], m["forgetting"]["mean"], m["forgetting"]["verdict"])
    with open(paths.sweep_dir("s") / "sweep.csv", newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["a", "b", "c"]
    md = (paths.sweep_dir("s") / "sweep.md").read_text()
    assert "**Recommendation: b.**" in md and "| b **(recommended)** |" in md
    (page,) = [report.sweep_section(x) for x in report.sweeps(ft_home / "outputs")]  # report.html's sweep section
    for name, r in rows.items():
        for key in ("tuned", "vs_best", "vs_best_ci_low", "forgetting", "tie", "lora.r"):
            assert f'data-run="{name}" data-key="sweep.{key}">{html.escape(report.fmt(r[key]))}<' in page


def test_among_ties_that_forget_alike_the_cheapest_is_recommended_and_nothing_new_rewrites_nothing(ft_home):
    scores = [0.4 + 0.1 * (i % 4) for i in range(40)]
    general = [2.2 + 0.05 * (i % 5) for i in range(40)]
    _fake_run("a", scores, general, 200.0)
    _fake_run("b", scores, general, 50.0)
    s = _report(["a", "b"])
    assert s["recommended"] == "b" and "trains the fastest of those" in s["reason"]
    files = {f: f.stat().st_mtime_ns for f in paths.sweep_dir("s").iterdir()}
    time.sleep(0.01)
    _report(["a", "b"])
    assert {f: f.stat().st_mtime_ns for f in paths.sweep_dir("s").iterdir()} == files


def test_runs_on_different_test_examples_are_not_compared(ft_home):
    _fake_run("a", [0.5, 0.6], [2.0], 1.0)
    _fake_run("b", [0.5, 0.6], [2.0], 1.0, ids=["x", "y"])
    with pytest.raises(io.UserError, match="different test examples"):
        _report(["a", "b"])


# --------------------------------------------------------------------------- end to end
def _sweep(home: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, FT_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(["make", f"PY={sys.executable}", "sweep", "RECIPE=smollm2", "TINY=1", f"GRID={GRID}",
                             "ARGS=--set train.max_steps=2 --set eval.num_examples=4"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.e2e
def test_a_tiny_2x2_sweep_killed_mid_run_finishes_only_the_missing_runs(ft_home, model_cache):
    make(ft_home, "install")  # outside the timed part
    names = [r.name for r in sweep.plan("smollm2", [], True, GRID, force=False).runs]
    out = [paths.RunPaths(n) for n in names]
    p = _sweep(ft_home, start_new_session=True)
    deadline = time.time() + 600
    while not (out[1].logs / "train.log").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # kill while the second run trains
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = (out[0].eval / "metrics.json").stat().st_mtime_ns
    assert not (out[1].eval / "metrics.json").exists() and not (out[2].out).exists()

    log = _sweep(ft_home).communicate()[0]
    assert f"[1/4] {names[0]}: up to date" in log and f"[2/4] {names[1]}: train.learning_rate=1e-3" in log, log[-3000:]
    assert (out[0].eval / "metrics.json").stat().st_mtime_ns == first
    summary = io.read_json(paths.sweep_dir("smollm2-tiny") / "sweep.json")
    assert [r["run"] for r in summary["rows"]] == names and summary["recommended"] in summary["ties"]
    for row, rp in zip(summary["rows"], out):  # the report against each run's own metrics.json and examples
        m = io.read_json(rp.eval / "metrics.json")
        assert (row["tuned"], row["verdict"], row["forgetting"]) == (
            m["tuned"]["rougeL"], m["verdict"]["verdict"], m["forgetting"]["mean"])
        with open(rp.eval / "side_by_side.csv", newline="") as fh:
            assert len(list(csv.DictReader(fh))) == m["n_examples"] == 4
    best = paths.RunPaths(summary["best"])
    assert {r["run"]: r["tie"] for r in summary["rows"]}[best.run] is True

    again = _sweep(ft_home).communicate()[0]
    assert "0 of 4 runs made now" in again and "scripts/0" not in again.replace("scripts/09_sweep", ""), again[-2000:]
    assert json.loads((paths.sweep_dir("smollm2-tiny") / "sweep.json").read_text()) == summary
