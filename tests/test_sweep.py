"""make sweep: a grid expands into named runs, each loaded like a recipe; a bad grid (a key that would change the
val/test examples included) stops in one line before anything trains; the report chooses the best run and its ties
on VAL (never test), pairs each run with it on the same val examples and recommends the least-forgetting (then
cheapest, train time summed over resumed segments) tie, figures read back from the runs' own files; replay and
extra val records leave test as it is and never hold the forgetting check's text; end to end, a tiny 2-run sweep
(replay 0 and 0.25) killed mid-run finishes only its missing run and a third `make sweep` makes nothing."""
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
from conftest import REPO, step

from common.core import config, io, paths, sweep
from common.data import splits
from common.evaluation import forgetting, metrics, sweep_report
from common.shipping import report
from common.training import history

GRID = "train.learning_rate=1e-3,2e-3 lora.r=4,8"
E2E_GRID = "data.replay=0,0.25"  # 2 runs: a kill in the second leaves one done, one missing


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
        assert cfg.data.val_extra == 16  # tiny sweep.val_size 32 = data.val_size 16 + 16 the sample left out
    args = sweep.make_command(p, p.runs[0])
    assert "TINY=1" in args and args[-1] == ("ARGS=--set train.max_steps=3 --set data.val_extra=16 --set "
                                             "train.learning_rate=1e-3 --set lora.r=4 --set "
                                             "run_name=smollm2-tiny--learning_rate-1e-3--r-4")


def test_the_recipes_sweep_section_is_the_grid_without_GRID(ft_home):
    p = sweep.plan("smollm2", [], False, None, force=False)
    assert [k for k, _ in p.grid] == ["train.learning_rate", "data.replay"]
    assert sorted({(c.train.learning_rate, c.data.replay) for c in p.cfgs.values()}) == [
        (5e-4, 0.0), (5e-4, 0.25), (1e-3, 0.0), (1e-3, 0.25)]
    assert {c.data.val_extra for c in p.cfgs.values()} == {160 - 32}  # sweep.val_size 160 on val_size 32


@pytest.mark.parametrize("grid, sets, words", [
    ("train.learnig_rate=1e-3,2e-3", [], ["train.learnig_rate", "unknown key", "learning_rate"]),
    ("lora.r=4,4", [], ["lora.r", "different"]),
    ("lora.r=4,8 lora.r=16", [], ["given twice"]),
    ("run_name=a,b", [], ["sets run names itself"]),
    ("lora.target_modules=[q_proj,v_proj]", [], ["no spaces, quotes or lists"]),
    ("train.batch_size=0,1", [], ["train.batch_size and train.grad_accum must be >= 1"]),
    ("lora.r=1,2,3 train.seed=1,2,3", [], ["9 runs", "sweep.max_runs=8", "FORCE=1"]),
    ("lora.r", [], ["expected key=value"]),
    ("data.val_size=16,32", [], ["grid key data.val_size changes the prepared val/test examples"]),
    ("lora.r=4,8 prompt.user=a,b", [], ["grid key prompt.user changes"]),
    ("train.max_length=128,256", [], ["grid key train.max_length changes"]),
    ("eval.num_examples=4,8", [], ["grid key eval.num_examples changes"]),
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
def _fake_run(name: str, scores: list[float], general: list[float], seconds: float, ids: list[str] | None = None,
              test: list[float] | None = None, test_ids: list[str] | None = None):
    """A finished run's files as eval and train write them (only what the sweep report reads): `scores` on val
    (eval/val_scores.csv), `test` (default: the same) on test."""
    rp = paths.RunPaths(name)
    ids = ids or [f"v{i}" for i in range(len(scores))]
    test = test or scores
    test_ids = test_ids or [f"t{i}" for i in range(len(test))]
    base_general = [2.0] * len(general)
    m = {"primary_metric": "rougeL", "n_examples": len(test), "tuned": {"rougeL": sum(test) / len(test)},
         "comparison": {"per_example": "rougeL"}, "strongest_baseline": "retrieval",
         "verdict": {"against": "retrieval", **metrics.paired(test, [0.3] * len(test), 200)},
         "forgetting": {"tuned_loss": sum(general) / len(general),
                        **metrics.paired(general, base_general, 200, higher_is_better=False)}}
    io.atomic_write_json(rp.eval / "metrics.json", m)
    io.atomic_write_text(rp.eval / "side_by_side.csv", "id,tuned,tuned_rougeL\n" + "".join(
        f"{i},\"an answer, with a comma\",{s}\n" for i, s in zip(test_ids, test)))
    io.atomic_write_text(rp.eval / "val_scores.csv", "id,tuned_rougeL\n" + "".join(
        f"{i},{s}\n" for i, s in zip(ids, scores)))
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
    assert "b cannot be told from the best run on val (60 examples), a," in s["reason"]
    assert "forgets the least" in s["reason"]
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


def test_runs_on_different_val_or_test_examples_are_not_compared(ft_home):
    _fake_run("a", [0.5, 0.6], [2.0], 1.0)
    _fake_run("b", [0.5, 0.6], [2.0], 1.0, ids=["x", "y"])
    with pytest.raises(io.UserError, match="different val examples"):
        _report(["a", "b"])
    _fake_run("b", [0.5, 0.6], [2.0], 1.0, test_ids=["x", "y"])
    with pytest.raises(io.UserError, match="different test examples"):
        _report(["a", "b"])


def test_the_best_run_and_its_ties_are_chosen_on_val_never_on_test(ft_home):
    n = 60
    val = [0.5 + 0.2 * (i % 3) for i in range(n)]
    _fake_run("a", [v - 0.2 for v in val], [2.0] * 40, 100.0, test=[v + 0.2 for v in val])  # best on test only
    _fake_run("b", val, [2.0] * 40, 100.0, test=val)  # best on val
    s = _report(["a", "b"])
    assert (s["best"], s["ties"], s["recommended"]) == ("b", ["b"], "b")  # on test, a would be the best
    assert s["chosen_on"] == f"val ({n} examples)"
    rows = {r["run"]: r for r in s["rows"]}
    assert rows["a"]["vs_best"] == metrics.paired([v - 0.2 for v in val], val, 500)["mean"]  # paired on val
    assert rows["a"]["val_tuned"] == pytest.approx(sum(val) / n - 0.2) and rows["a"]["tuned"] > rows["b"]["tuned"]
    md = (paths.sweep_dir("s") / "sweep.md").read_text()
    assert "chosen on val (60 examples), never on test" in md and "best mean rougeL on val (60 examples)" in md
    assert "On test (60 examples, reported once for the chosen run)" in s["reason"]


def test_a_run_evaluated_without_val_scores_is_one_line(ft_home):
    _fake_run("a", [0.5] * 40, [2.0], 1.0)
    _fake_run("b", [0.5] * 40, [2.0], 1.0)
    (paths.RunPaths("b").eval / "val_scores.csv").unlink()
    with pytest.raises(io.UserError) as e:
        _report(["a", "b"])
    assert "\n" not in str(e.value) and "val_scores.csv does not exist" in str(e.value) and "make sweep" in str(e.value)


# --------------------------------------------------------------------------- train time over resumed segments
class _Args:
    def __init__(self, out):
        self.output_dir = str(out)


class _State:
    is_world_process_zero = True

    def __init__(self, step):
        self.global_step = step


def test_train_time_is_summed_over_resumed_segments(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(history.time, "time", lambda: now[0])
    first = history.train_clock(history.seconds_before(None))  # a fresh run: nothing before it
    now[0] += 30.0
    (tmp_path / "checkpoint-20").mkdir()
    first.on_save(_Args(tmp_path), _State(20), None)
    now[0] += 12.0  # trained on after the save, then killed (-9): this time is lost with the work it did
    assert history.seconds_before(tmp_path / "checkpoint-20") == 30.0
    second = history.train_clock(history.seconds_before(tmp_path / "checkpoint-20"))  # resumed
    now[0] += 25.0
    (tmp_path / "checkpoint-40").mkdir()
    second.on_save(_Args(tmp_path), _State(40), None)
    now[0] += 5.0
    third = history.train_clock(history.seconds_before(tmp_path / "checkpoint-40"))  # killed and resumed again
    now[0] += 20.0
    assert history.seconds_before(tmp_path / "checkpoint-40") == 30.0 + 25.0
    assert third.seconds() == 30.0 + 25.0 + 20.0  # run_info.json's train_seconds: every segment to its checkpoint
    assert history.seconds_before(tmp_path / "checkpoint-60") == 0.0  # no record: not counted, and said so


# --------------------------------------------------------------------------- replay and extra val records
def _sentences(text: str) -> set[str]:
    import re

    return {x.strip().lower() for x in re.split(r"(?<=[.!?])\s+", text) if x.strip()}


def _runs_of_words(text: str, n: int = 6) -> set[tuple[str, ...]]:
    import re

    w = re.findall(r"[a-z']+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_the_replay_text_never_holds_the_forgetting_checks_text():
    replay, checked = splits.replay_passages(), forgetting.passages()
    assert len(replay) >= 300 and len(set(replay)) == len(replay)
    assert not set(replay) & set(checked)
    assert not set().union(*map(_sentences, replay)) & set().union(*map(_sentences, checked))
    assert not set().union(*map(_runs_of_words, replay)) & set().union(*map(_runs_of_words, checked))


def test_replay_share_and_extra_val_leave_test_and_the_task_examples_as_they_are(ft_home):
    step("01_prepare", "--recipe", "smollm2", "--tiny")
    rp = paths.RunPaths("smollm2-tiny")
    plain = {n: io.read_jsonl(rp.split(n)) for n in ("train", "val", "test")}
    step("01_prepare", "--recipe", "smollm2", "--tiny", "--set", "data.replay=0.25", "--set", "data.val_extra=20",
         "--set", "run_name=mixed")
    mixed = {n: io.read_jsonl(paths.RunPaths("mixed").split(n)) for n in ("train", "val", "test")}
    assert mixed["test"] == plain["test"]  # the same test examples, in the same order
    assert mixed["val"][:len(plain["val"])] == plain["val"] and len(mixed["val"]) == len(plain["val"]) + 20
    extra = {r["id"] for r in mixed["val"][len(plain["val"]):]}
    assert not extra & {r["id"] for n in ("train", "test") for r in plain[n]}
    task = [r for r in mixed["train"] if not r.get("replay")]
    replayed = [r for r in mixed["train"] if r.get("replay")]
    assert sorted(task, key=lambda r: r["id"]) == sorted(plain["train"], key=lambda r: r["id"])
    assert len(replayed) == splits.replay_count(0.25, len(task)) == len(task) // 3  # a quarter of the split
    assert len(replayed) / len(mixed["train"]) == 0.25
    texts = set(splits.replay_passages())
    for r in replayed:
        assert r["prompt"][-1] == {"role": "user", "content": splits.REPLAY_ASK}
        assert r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"] in texts
    assert not {r["completion"][0]["content"] for r in replayed} & set(forgetting.passages())
    rep = io.read_json(paths.RunPaths("mixed").prepare_report)
    assert rep["replay"]["examples"] == len(replayed) and rep["splits"]["train"] == len(mixed["train"])
    assert rep["val_extra"] == 20 and rep["kept"] == sum(len(v) for v in plain.values()) + 20


# --------------------------------------------------------------------------- end to end
def _sweep(home: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, FT_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(["make", f"PY={sys.executable}", "sweep", "RECIPE=smollm2", "TINY=1", f"GRID={E2E_GRID}",
                             "ARGS=--set train.max_steps=2 --set eval.num_examples=4"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.e2e
def test_a_tiny_sweep_killed_mid_run_finishes_only_the_missing_run(ft_home, installed):
    installed(ft_home)  # the session's env.json: make sweep installs nothing
    names = [r.name for r in sweep.plan("smollm2", [], True, E2E_GRID, force=False).runs]
    out = [paths.RunPaths(n) for n in names]
    p = _sweep(ft_home, start_new_session=True)
    deadline = time.time() + 600
    while not (out[1].logs / "train.log").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # kill while the second run trains
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = (out[0].eval / "metrics.json").stat().st_mtime_ns
    assert (out[0].eval / "val_scores.csv").exists() and not (out[1].eval / "metrics.json").exists()

    log = _sweep(ft_home).communicate()[0]
    assert f"[1/2] {names[0]}: up to date" in log, log[-3000:]
    assert f"[2/2] {names[1]}: data.replay=0.25" in log, log[-3000:]
    assert (out[0].eval / "metrics.json").stat().st_mtime_ns == first
    summary = io.read_json(paths.sweep_dir("smollm2-tiny") / "sweep.json")
    assert [r["run"] for r in summary["rows"]] == names and summary["recommended"] in summary["ties"]
    assert summary["chosen_on"] == "val (32 examples)"  # tiny sweep.val_size: 16 + 16 records the sample left out
    for row, rp in zip(summary["rows"], out):  # the report against each run's own metrics.json and examples
        m = io.read_json(rp.eval / "metrics.json")
        assert (row["tuned"], row["verdict"], row["forgetting"]) == (
            m["tuned"]["rougeL"], m["verdict"]["verdict"], m["forgetting"]["mean"])
        with open(rp.eval / "side_by_side.csv", newline="") as fh:
            assert len(list(csv.DictReader(fh))) == m["n_examples"] == 4
        with open(rp.eval / "val_scores.csv", newline="") as fh:
            val = [float(r["tuned_rougeL"]) for r in csv.DictReader(fh)]
        assert len(val) == m["val"]["n_examples"] == 32 and row["val_tuned"] == sum(val) / 32
    best = paths.RunPaths(summary["best"])
    assert {r["run"]: r["tie"] for r in summary["rows"]}[best.run] is True

    again = _sweep(ft_home).communicate()[0]
    assert "0 of 2 runs made now" in again and "scripts/0" not in again.replace("scripts/09_sweep", ""), again[-2000:]
    assert json.loads((paths.sweep_dir("smollm2-tiny") / "sweep.json").read_text()) == summary
