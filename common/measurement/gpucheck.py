"""Run the whole GPU verification (make gpu-check) as budgeted parts of one process tree, and report every part.

The parts (common/measurement/gpucheck_parts.py, in order; the report: common/measurement/gpucheck_report.py):

  parallel, started together   the `gpu`-marked tests split by test id into GPU_TEST_SHARDS pytest processes;
                               `make all TINY=1` on CUDA for one recipe per architecture family (llama: tinyllama;
                               mistral: mistral-xauusd; t5: flan-t5); building the full-shape
                               stand-ins the benches load (the GPU is mostly idle meanwhile)
  alone, one after another     `make bench SHAPE=full BENCH="--profile ..."` for tinyllama, mistral-xauusd and
                               llama3-alpaca (ours, plain TRL defaults, one row per GPU switch, generation); a T4-sized
                               run (tinyllama fp16 under a 16 GB cap) and a 24 GB-capped 7-8B run (llama3-alpaca)

Each part runs in its own process group and its own artifact root (FT_HOME under outputs/gpu-check/work/), all
sharing one model cache (FT_CACHE), so a stand-in built once serves every part. A part gets its budget (seconds;
never more than what is left of TOTAL_BUDGET_S); one that overruns it is killed with its children and reported as
overran, and the next part still runs. The benches run alone so that nothing else shares the GPU while they time.

The dry run (--dry-run, `make gpu-check DRY_RUN=1`) runs the same orchestration on a CPU with stand-in budgets of
seconds: the gpu tests (collected, sharded and run: they skip without CUDA), `make prepare` for tinyllama, and
the tinyllama bench's row selection plus its `ours` row (a real training step) for one timed step; every other part
only has its recipe settings validated (common.core.config), so a misspelt key fails here, not on the borrowed GPU.

Writes outputs/gpu-check/<date>-<gpu>.json and .md (one table: each part passed / failed with its exception's last
line / overran, elapsed; then every figure of the benches' JSONs, the GPU named, and make plan's predicted peak and
error on each `ours` row) and logs/<part>.log.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.core import io, paths
from common.measurement.gpucheck_parts import (
    DRY_TOTAL_BUDGET_S,
    FAIL_ENV,
    GPU_TEST_SHARDS,
    TOTAL_BUDGET_S,
    Part,
    parts,
)
from common.measurement.gpucheck_report import (
    bench_figures,
    last_error_line,
    markdown,
    planner_errors,
)


def _kill(p: subprocess.Popen) -> None:
    """End a part and every process it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Running:
    part: Part
    cmd: str
    proc: subprocess.Popen
    log: Path
    start: float
    budget: float


_LIVE: list[Running] = []  # parts started and not yet finished: ended with the check, however it ends


def _start(part: Part, cmd: str, budget: float, root: Path, cache: Path, env_json: Path | None) -> Running:
    home = root / "work" / part.name
    (home / "outputs").mkdir(parents=True, exist_ok=True)
    if env_json:  # what 00_install found here: make then installs nothing in the part's own artifact root
        (home / "outputs" / "env.json").write_bytes(env_json.read_bytes())
    log = root / "logs" / f"{part.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FT_HOME": str(home), "FT_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("DATA_PATH", None)
    fh = open(log, "w", encoding="utf-8")
    fh.write(f"$ {cmd}\n")
    fh.flush()
    print(f"[{part.name}] start (budget {budget:.0f} s): {part.what}", flush=True)
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], cwd=paths.REPO, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    r = Running(part, cmd, proc, log, time.monotonic(), budget)
    _LIVE.append(r)
    return r


def _finish(r: Running, overran: bool) -> dict:
    elapsed = time.monotonic() - r.start
    text = r.log.read_text(encoding="utf-8", errors="replace")
    if overran:
        status, error = "overran", f"killed after {elapsed:.0f} s (budget {r.budget:.0f} s)"
    elif r.proc.returncode == 0:
        status, error = "passed", None
    else:
        status, error = "failed", last_error_line(text)
    # pytest's closing line (how many passed, failed, skipped), for the test shards
    summary = [ln.strip(" =") for ln in text.splitlines()
               if re.match(r"^=* ?\d+ (passed|failed|skipped|deselected|error)", ln.strip())]
    print(f"[{r.part.name}] {status} in {elapsed:.1f} s (budget {r.budget:.0f} s)" + (f": {error}" if error else ""),
          flush=True)
    row = {"name": r.part.name, "what": r.part.what, "status": status, "error": error,
           "elapsed_s": round(elapsed, 1), "budget_s": r.budget, "command": r.cmd,
           "log": str(r.log.relative_to(r.log.parents[1]))}
    if summary:
        row["pytest"] = summary[-1]
    return row


def _wait(running: list[Running], deadline: float) -> list[dict]:
    """Wait for the parts, killing each one at its budget (or at the whole check's deadline)."""
    out: dict[str, dict] = {}
    while running:
        now = time.monotonic()
        for r in list(running):
            done = r.proc.poll() is not None
            over = not done and (now - r.start > r.budget or now > deadline)
            if done or over:
                _kill(r.proc)  # an overrun part, or whatever a finished one left running in its group
                out[r.part.name] = _finish(r, over)
                running.remove(r)
                _LIVE.remove(r)
        time.sleep(0.2)
    return [out[r] for r in out]


def _skipped(part: Part, why: str, status: str = "skipped", error: str | None = None, elapsed: float = 0.0) -> dict:
    print(f"[{part.name}] {status}: {error or why}", flush=True)
    return {"name": part.name, "what": part.what, "status": status, "error": error, "elapsed_s": round(elapsed, 1),
            "budget_s": 0, "command": None, "note": why}


def _validate(part: Part) -> dict:
    """Dry run of a part too costly for the CPU: its recipe settings, exactly as the GPU run passes them."""
    t = time.monotonic()
    for flags in part.checks:
        p = subprocess.run([sys.executable, "-m", "common.core.config", *shlex.split(flags)], cwd=paths.REPO,
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            return _skipped(part, "dry run: settings only", "failed", last_error_line(p.stderr + p.stdout),
                            time.monotonic() - t)
    return _skipped(part, f"dry run: settings validated ({len(part.checks)}), not run on the CPU", "validated",
                    elapsed=time.monotonic() - t)


def probe_env() -> Path:
    """outputs/env.json of this artifact root, written by `00_install --probe` (no pip) where it is missing; each
    part gets a copy, so no part's `make` runs the installer (on the offline GPU machine it would fail)."""
    f = paths.env_json()
    if not f.is_file():
        p = subprocess.run([sys.executable, "-m", "scripts.00_install", "--probe"], cwd=paths.REPO,
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise io.UserError(f"python -m scripts.00_install --probe failed: {last_error_line(p.stdout + p.stderr)}")
    return f


def collect_gpu_tests(timeout: float) -> list[str]:
    """The ids of the gpu-marked tests (pytest --collect-only)."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_gpu.py"], cwd=paths.REPO, capture_output=True, text=True, timeout=timeout)
    ids = [ln.strip() for ln in p.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    if p.returncode not in (0, 5) or not ids:
        raise RuntimeError(f"collecting the gpu tests failed: {last_error_line(p.stdout + p.stderr)}")
    return ids


def shards(ids: list[str], n: int) -> list[list[str]]:
    """Round-robin by test id: each recipe's end-to-end test lands on another shard."""
    return [ids[k::n] for k in range(n)]


def gpu_name() -> str | None:
    """The GPU's name from nvidia-smi (None without one); the orchestrator never initialises CUDA itself."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [x.strip() for x in p.stdout.splitlines() if x.strip()]
    return names[0] if p.returncode == 0 and names else None


def gpu_memory_gb() -> float | None:
    """The GPU's memory (GiB, as torch reports it) from nvidia-smi, without initialising CUDA here."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           check=False, capture_output=True, text=True, timeout=30)
        return float(p.stdout.split()[0]) / 1024 if p.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(dry_run: bool = False, only: list[str] | None = None, budget_scale: float = 1.0) -> dict:
    """Run the parts and write the report; returns it."""
    gpu = gpu_name()
    if not dry_run and not gpu:
        raise io.UserError("no NVIDIA GPU here (nvidia-smi found none); on a CPU use the dry run: "
                           "make gpu-check DRY_RUN=1")
    all_parts = parts()
    names = [p.name for p in all_parts]
    bad = [x for x in only or [] if x not in names]
    if bad:
        raise io.UserError(f"--only: unknown part(s) {', '.join(bad)}; choose from {', '.join(names)}")
    chosen = [p for p in all_parts if not only or p.name in only]
    root = paths.gpu_check_dir()
    for sub in ("logs", "work"):
        shutil.rmtree(root / sub, ignore_errors=True)  # this run's logs and artifacts only
    cache = paths.cache_root()
    env_json = probe_env()
    total = (DRY_TOTAL_BUDGET_S if dry_run else TOTAL_BUDGET_S) * budget_scale
    t0 = time.monotonic()
    deadline = t0 + total
    label = gpu if not dry_run else "CPU dry run"
    print(f"gpu-check on {label}: {len(chosen)} parts, {total:.0f} s in all", flush=True)
    subs = substitutions()
    results: list[dict] = []
    test_parts = [p for p in chosen if p.name.startswith("gpu-tests")]
    if test_parts:
        try:
            groups = shards(collect_gpu_tests(min(120.0, total)), GPU_TEST_SHARDS)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            groups = None
            results += [_skipped(p, "collection failed", "failed", str(e).splitlines()[-1][:300]) for p in test_parts]
        if groups:
            subs.update({f"shard{k}": " ".join(shlex.quote(x) for x in g) for k, g in enumerate(groups)})
            empty = [p for k, p in enumerate(all_parts[:GPU_TEST_SHARDS]) if p in chosen and not groups[k]]
            results += [_skipped(p, "no test ids left for this shard") for p in empty]
            test_parts = [p for p in test_parts if p not in empty]
        else:
            test_parts = []
    todo = [p for p in chosen if not p.name.startswith("gpu-tests") or p in test_parts]

    def command(p: Part) -> str | None:
        return shell_command(p, dry_run, subs, root / "work" / p.name)

    def budget(p: Part) -> float:
        return max(1.0, min((p.dry_budget_s if dry_run else p.budget_s) * budget_scale, deadline - time.monotonic()))

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)  # killed from outside: end the parts (their own sessions) too
    try:
        # the parallel phase: started together
        running = []
        for p in [p for p in todo if p.parallel]:
            c = command(p)
            if c is None:
                results.append(_validate(p))
            else:
                running.append(_start(p, c, budget(p), root, cache, env_json))
        results += _wait(running, deadline)
        # the parts that run alone
        for p in [p for p in todo if not p.parallel]:
            c = command(p)
            if c is None:
                results.append(_validate(p))
            elif deadline - time.monotonic() < 1:
                results.append(_skipped(p, "the check's total budget was spent", "overran",
                                        f"not started: the {total:.0f} s budget was spent"))
            else:
                results += _wait([_start(p, c, budget(p), root, cache, env_json)], deadline)
    finally:
        signal.signal(signal.SIGTERM, before)
        while _LIVE:
            _kill(_LIVE.pop().proc)
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r["name"]])
    from common.core import metadata

    benches = {p.name: bench_figures(root / "work" / p.name / "outputs" / "bench" / f"{run_of(p, dry_run)}.json")
               for p in chosen if p.bench}
    memory = None if dry_run else gpu_memory_gb()
    for p in chosen:  # make plan's error on every row the benches ran: the next lent GPU calibrates the planner
        if benches.get(p.name) and p.checks:
            flags = p.checks[0].replace("--set tiny.shape=full", "") if dry_run else p.checks[0]  # dry: TINY=1
            planner_errors(benches[p.name], flags, root / "work" / p.name, memory)
    rep = {"gpu": gpu or "none", "label": label, "dry_run": dry_run, "date": dt.date.today().isoformat(),
           "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "git_commit": metadata.git_commit(), "budget_s": total, "elapsed_s": round(time.monotonic() - t0, 1),
           "parts": results, "benches": {k: v for k, v in benches.items() if v}}
    stem = f"{rep['date']}-{slug(gpu) if gpu and not dry_run else 'cpu-dry-run'}"
    io.atomic_write_json(root / f"{stem}.json", rep)
    io.atomic_write_text(root / f"{stem}.md", markdown(rep))
    rep["files"] = [str(root / f"{stem}.json"), str(root / f"{stem}.md")]
    print(f"wrote {root / (stem + '.json')} and {root / (stem + '.md')}", flush=True)
    return rep


def substitutions() -> dict[str, str]:
    """What a part's command template names: {make} and {py} (this interpreter); run() adds {shardN}."""
    return {"make": f"make PY={shlex.quote(sys.executable)}", "py": shlex.quote(sys.executable)}


def shell_command(p: Part, dry_run: bool, subs: dict[str, str], work: Path) -> str | None:
    """The bash command a part runs here (None: the dry run only validates its settings)."""
    if os.environ.get(FAIL_ENV) == p.name:  # tests only: a part that fails the way a real one would
        return f"{shlex.quote(sys.executable)} -c \"raise RuntimeError('injected failure in {p.name}')\""
    c = p.dry_cmd if dry_run else p.cmd
    return None if c is None else c.format(**subs, work=shlex.quote(str(work)))


def run_of(p: Part, dry_run: bool) -> str:
    """The bench run name the part writes: <recipe>-full on the GPU, <recipe>-tiny in the dry run."""
    return p.bench.replace("-full", "-tiny") if dry_run and p.bench else p.bench or ""


