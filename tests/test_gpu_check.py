"""make gpu-check without a GPU: the dry run's orchestration and report, a failing and an overrunning part, the bench
rows it picks, and the carry folder's building blocks (bitsandbytes slimmed, sizes against the 64 MiB limit)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from common.measurement import gpucheck
from common.measurement import gpucheck_parts as gparts
from common.measurement.gpucheck_report import last_error_line
from scripts import gpu_carry

pytestmark = pytest.mark.e2e  # trains models or runs pipeline steps (make test-fast leaves it out)


def dry_run(ft_home: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """`make gpu-check DRY_RUN=1` (the README's command), or the script itself when given its own options."""
    cmd = ([sys.executable, "scripts/gpu_check.py", "--dry-run", *args] if args else
           ["make", f"PY={sys.executable}", "gpu-check", "DRY_RUN=1"])
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    out = ft_home / "outputs" / "gpu-check"
    reports = sorted(out.glob("*-cpu-dry-run.json"))
    assert reports, p.stdout[-3000:] + p.stderr[-3000:]
    return p, json.loads(reports[-1].read_text()), reports[-1].with_suffix(".md").read_text()


def test_dry_run_runs_every_part_and_reports_it(ft_home):
    p, rep, md = dry_run(ft_home)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    parts = gparts.parts()
    assert [r["name"] for r in rep["parts"]] == [x.name for x in parts]
    for part, r in zip(parts, rep["parts"]):
        assert r["status"] == ("passed" if part.dry_cmd else "validated"), r
        assert r["elapsed_s"] >= 0 and r["error"] is None
        assert f"| {part.name} | {r['status']}" in md
    assert rep["dry_run"] and rep["label"] == "CPU dry run" and rep["elapsed_s"] <= rep["budget_s"] + 5
    # the gpu tests were collected, split by id over the shards and each one ran (skipped: no CUDA here)
    collected = gpucheck.collect_gpu_tests(120)
    ran = [int(m.group(1)) for r in rep["parts"] if r["name"].startswith("gpu-tests")
           for m in [re.search(r"(\d+) skipped", r["pytest"])]]
    assert sum(ran) == len(collected) and len(ran) == gparts.GPU_TEST_SHARDS
    # the bench part picked its rows (ours, plain TRL defaults, the switch rows there are here) and its figures
    # made it into the report
    log = (ft_home / "outputs/gpu-check/logs/bench-tinyllama.log").read_text()
    assert "rows here: ours,trl-defaults," in log
    ours = rep["benches"]["bench-tinyllama"]["training"]["ours"]
    # MFU divides by a matmul peak timed for half a second while the other pytest worker runs (CI: 1.05 once), so a
    # tiny model's figure is bounded loosely here (test_training.py's bench test keeps the < 1 bound)
    assert ours["tokens_per_s"] > 0 and ours["s_per_step"] > 0 and 0 < ours["mfu"] < 2
    assert "## bench-tinyllama: tinyllama-tiny on " in md and "| ours | " in md
    # make plan's prediction beside the row it ran (peak RSS here; reserved + context on a GPU), its error in the table
    p = ours["planner"]
    assert p["compared"] == "rss" and p["predicted_gb"] > 0 and p["measured_gb"] > 0
    assert p["error"] == round(p["predicted_gb"] / p["measured_gb"] - 1, 3) and "prepare_report.json" in p["lengths_from"]
    assert "| planned GB | planner error |" in md and f"{p['error'] * 100:+.0f}% vs {p['measured_gb']:.2f} rss |" in md
    out = ft_home / "outputs/gpu-check"
    assert all(f.stat().st_size < 64_000 for f in out.glob("*-cpu-dry-run.*"))  # KBs: it must come back


def test_a_failing_and_an_overrunning_part_are_reported_and_the_rest_still_runs(ft_home):
    """An injected exception in one part, a budget too small for the next: both reported, the last still runs."""
    p, rep, md = dry_run(ft_home, "--only", "pipeline-mistral,bench-tinyllama,t4-tinyllama-fp16-16gb",
                         "--budget-scale", "0.05", **{gparts.FAIL_ENV: "pipeline-mistral"})
    assert p.returncode == 1
    got = {r["name"]: r for r in rep["parts"]}
    assert list(got) == ["pipeline-mistral", "bench-tinyllama", "t4-tinyllama-fp16-16gb"]
    failed, over, rest = got.values()
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: injected failure in pipeline-mistral"
    assert over["status"] == "overran" and over["error"].startswith("killed after") and over["elapsed_s"] < 15
    assert rest["status"] == "validated"
    assert "| pipeline-mistral | failed: RuntimeError: injected failure in pipeline-mistral |" in md
    assert "| bench-tinyllama | overran: killed after" in md
    # the overrun part was killed with everything it started (make, the bench and its workers)
    work = str(ft_home / "outputs/gpu-check/work/bench-tinyllama")
    left = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FT_HOME={work}\0".encode() in env.read_bytes():
                left.append(env.parent.name)
        except OSError:
            continue
    assert not left, left


def test_an_unknown_part_is_one_line_and_exit_2(ft_home):
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--only", "bench-nope"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: --only: unknown part(s) bench-nope; choose from ")
    assert len(p.stderr.strip().splitlines()) == 1


def test_the_error_line_is_the_exception_that_ended_the_part():
    last = last_error_line
    assert last("x\nFAILED tests/test_gpu.py::test_a[x] - AssertionError: boom\nFAILED tests/b\n= 2 failed") == \
        "FAILED tests/test_gpu.py::test_a[x] - AssertionError: boom"
    assert last("Traceback (most recent call last):\n  File 'a'\nValueError: no\nmake: *** [x] Error 1") == \
        "ValueError: no"
    assert last("03:01 step\nerror: AttributeError: foo (unexpected)\nmake: *** [Makefile:83: x] Error 1") == \
        "error: AttributeError: foo (unexpected)"
    flat = "Makefile:49: *** Traceback (most recent call last):   File \"c.py\", line 2   raise ConfigError(e)   " \
           "common.core.config.ConfigError: bad key.  Stop."
    assert last(flat) == "common.core.config.ConfigError: bad key.  Stop."
    assert last("") == "no output"


def test_the_bench_rows_are_ours_trl_defaults_and_one_per_gpu_switch(monkeypatch):
    """On a GPU plan every variant that flips a switch of docs/gpu.md is picked, and nothing else but ours,
    plain TRL defaults and generation."""
    from common.core import config
    from common.measurement import bench_rows
    from common.training import plan

    real = plan.resolve

    def on_cuda(cfg):
        p = real(cfg)
        p.device, p.padding_free, p.quant_bits = "cuda", True, 4
        return p

    monkeypatch.setattr(plan, "resolve", on_cuda)
    rows = gparts.bench_rows("tinyllama", gparts.SWITCHES, full=False)
    cfg = config.load("tinyllama", [], tiny=True)
    specs = bench_rows.variants(cfg, on_cuda(cfg))
    flips = {n for n, s in specs.items()
             if any(x.split("=", 1)[0].rsplit(".", 1)[-1] in gparts.SWITCHES for x in s["sets"])}
    assert rows[0] == "ours" and rows[-1] == "generation" and "trl-defaults" in rows
    assert set(rows) - {"ours", "trl-defaults", "generation"} == flips and flips  # ours-padded, ours-varlen, ...
    assert "reference" not in rows and "trl-defaults-fp32" not in rows
    assert gparts.bench_rows("tinyllama", (), full=False) == ["ours", "trl-defaults", "generation"]


def test_every_gpu_command_is_valid_bash_and_names_real_targets_and_recipes(tmp_path):
    """The GPU run's commands cannot be run here; they are checked as text: bash parses each one, every make call
    names a Makefile target and a recipe, and every --set key is one the recipe accepts (the dry run validates)."""
    subs = {**gpucheck.substitutions(), **{f"shard{k}": f"tests/test_gpu.py::t{k}" for k in
                                           range(gparts.GPU_TEST_SHARDS)}}
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    recipes = {f.stem for f in (REPO / "recipes").glob("*.yaml")}
    calls = []
    for part in gparts.parts():
        cmd = gpucheck.shell_command(part, False, subs, tmp_path)
        p = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert p.returncode == 0, (part.name, p.stderr)
        calls += [(part.name, *m) for m in re.findall(r"make PY=\S+ (\w[\w-]*) RECIPE=([\w.-]+)", cmd)]
        assert part.dry_cmd or part.checks, part.name  # the dry run runs it, or validates its settings
    assert len(calls) >= 9 and all(t in targets and r in recipes for _, t, r in calls), calls


def test_the_budgets_fit_eight_minutes_and_the_dry_run_its_own():
    parts = gparts.parts()
    for total, key in ((gparts.TOTAL_BUDGET_S, "budget_s"), (gparts.DRY_TOTAL_BUDGET_S, "dry_budget_s")):
        run = [x for x in parts if key == "budget_s" or x.dry_cmd]
        longest = max(getattr(x, key) for x in run if x.parallel)
        assert longest + sum(getattr(x, key) for x in run if not x.parallel) <= total
    assert gparts.TOTAL_BUDGET_S <= 480


# --------------------------------------------------------------------------- the carry folder
def fake_bnb_wheel(folder: Path, libs: dict[str, int]) -> Path:
    w = folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    info = "bitsandbytes-0.50.2.dist-info"
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n",
             **{f"bitsandbytes/libbitsandbytes_{k}.so": os.urandom(n) for k, n in libs.items()},
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              b"Tag: py3-none-manylinux_2_24_x86_64\n"}
    record = "".join(f"{n},{gpu_carry._record_hash(d)},{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(w, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", record)
    return w


def test_bitsandbytes_is_slimmed_to_its_cpu_and_cuda13_libraries_and_still_installs(tmp_path):
    w = fake_bnb_wheel(tmp_path, {"cuda118": 300_000, "cuda128": 300_000, "rocm64": 100_000, "xpu2025": 50_000,
                                  "cuda130": 20_000, "cuda132": 20_000, "cpu": 5_000})
    saved = gpu_carry.slim_bitsandbytes(w)
    assert saved > 700_000 and gpu_carry.slim_bitsandbytes(w) == 0  # a second pass has nothing to drop
    with zipfile.ZipFile(w) as z:
        libs = sorted(n.rsplit("/", 1)[1] for n in z.namelist() if n.endswith(".so"))
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    assert "cuda118" not in record and "rocm" not in record and "cuda130.so" in record
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(tmp_path / "site"), str(w)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "site/bitsandbytes").glob("*.so")) == libs


def test_the_carry_folder_is_measured_with_the_working_tree_against_64_mib(tmp_path):
    carry = tmp_path / ".gpu"
    tok = tmp_path / "tok"
    tok.mkdir()
    for name, data in (("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"), ("chat_template.jinja", "x"),
                       ("model.safetensors", "weights"), ("config.json", "{}")):
        (tok / name).write_text(data)
    gpu_carry.copy_tokenizers(carry, {"smollm2": tok})
    assert sorted(f.name for f in (carry / "tokenizers/smollm2").iterdir()) == \
        ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]  # tokenizer files only, no weights
    (carry / "a.whl").write_bytes(b"x" * 1000)
    tree = gpu_carry.working_tree_bytes()
    assert 100_000 < tree < 32 * 2 ** 20  # the repository itself leaves room for the wheels
    m = gpu_carry.measure(carry, tree)
    assert m["fits"] and m["carry_bytes"] == 1000 + 2 + 2 + 1 and m["files"]["a.whl"] == 1000
    assert not gpu_carry.measure(carry, gpu_carry.LIMIT_BYTES - 1000)["fits"]
    with open(carry / "big.whl", "wb") as f:  # sparse: 65 MiB on paper, nothing on disk
        f.truncate(65 * 2 ** 20)
    p = subprocess.run([sys.executable, "scripts/gpu_carry.py", "--check", "--out", str(carry)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "DOES NOT FIT" in p.stdout and p.stderr.startswith("error: ")
    assert json.loads((carry / "manifest.json").read_text())["fits"] is False
    (carry / "big.whl").unlink()
    p = subprocess.run([sys.executable, "scripts/gpu_carry.py", "--check", "--out", str(carry)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "fits" in p.stdout


def test_the_carried_wheels_are_the_pinned_versions():
    req = (REPO / "requirements.txt").read_text()
    pins = gpu_carry.pins(REPO / "requirements.txt")
    for name in ("transformers", "peft", "trl", "datasets", "bitsandbytes", "gguf", "rouge-score"):
        assert f"{name}=={pins[name]}" in req, name
    assert all(pins[n] for n in gpu_carry.HELPERS) and "accelerate" not in pins  # the image has accelerate 1.15.0


def test_offline_install_probes_the_environment_without_pip(ft_home):
    """FT_OFFLINE=1 (the borrowed GPU has no package index): `make install` records outputs/env.json and runs no pip."""
    from conftest import make

    p = make(ft_home, "install", FT_OFFLINE="1")
    assert "--probe" in p.stdout and "-m pip install" not in p.stdout + p.stderr, p.stdout[-2000:]
    env = json.loads((ft_home / "outputs/env.json").read_text())
    assert env["torch"] and "cuda_available" in env
