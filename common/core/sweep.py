"""make sweep's plan and driver: a grid of settings expanded into runs, each one validated, named and made in turn.

A grid is `key=v1,v2 key=v1,v2` (GRID= on make's command line) or the recipe's `sweep.grid` ({key: [values]});
every combination is one run with its own run name (paths.sweep_run_name) and folders, so Make's stamps skip a run
that already finished and a killed sweep, restarted, makes only what is missing. Every combination is loaded like a
recipe (config.load) before anything trains, so a misspelt key or a value that breaks a rule stops the sweep in one
line; so does a key that would change the val or test examples (runs are compared on the same ones). The runs are
chosen between on val: sweep.val_size asks for a larger val split (data.val_extra: records the sample left out, so
train and test stay the same examples). Runs are made one after another (two trainings on one machine only slow
each other down).
"""
from __future__ import annotations

import itertools
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from common.core import config, paths, stamps
from common.core.io import UserError

log = logging.getLogger("ft")

_VALUE = re.compile(r"[A-Za-z0-9._+\-/:]+")  # a value Make passes through ARGS and the shell unchanged
# Settings prepare reads (its stamp) and eval's choice of examples change the val or test examples the runs are
# compared on; data.replay only adds to the train split.
SAME_EXAMPLES = ("data.replay",)
CHANGES_EXAMPLES = (*stamps.STEP_KEYS["prepare"], "eval.split", "eval.num_examples")


def changes_examples(key: str) -> bool:
    """Whether a setting changes the val or test examples a sweep's runs are compared on."""
    return key not in SAME_EXAMPLES and any(key == k or key.startswith(k + ".") for k in CHANGES_EXAMPLES)


@dataclass(frozen=True)
class Run:
    """One combination: its run name and the --set items that make it."""

    name: str
    setting: tuple[tuple[str, str], ...]  # (key, value as text), in grid order

    @property
    def sets(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.setting] + [f"run_name={self.name}"]


@dataclass
class Plan:
    """The sweep: its name (the base run's), the recipe's command-line flags, the grid and its runs."""

    name: str
    recipe: str
    tiny: bool
    base_sets: list[str]
    grid: list[tuple[str, list[str]]]
    runs: list[Run] = field(default_factory=list)
    cfgs: dict = field(default_factory=dict)  # run name -> its loaded recipe

    def describe(self) -> str:
        sizes = " x ".join(str(len(v)) for _, v in self.grid)
        keys = "; ".join(f"{k} in {', '.join(v)}" for k, v in self.grid)
        return f"sweep {self.name}: {keys} -> {sizes} = {len(self.runs)} runs"


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """'train.learning_rate=2e-4,1e-3 lora.r=8,16' -> [(key, [value texts])], each key once, each value once."""
    grid: list[tuple[str, list[str]]] = []
    for item in text.split():
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise UserError(f"GRID item {item!r}: expected key=value,value,..., e.g. GRID=\"lora.r=8,16\"")
        grid.append((key, values.split(",")))
    return grid


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise UserError(f"sweep.grid value {value!r}: a grid value must be a number, a word or true/false")


def from_recipe(grid: dict) -> list[tuple[str, list[str]]]:
    """The recipe's sweep.grid ({key: [values]}) as (key, [value texts])."""
    out = []
    for key, values in grid.items():
        if not isinstance(values, list):
            raise UserError(f"sweep.grid.{key} must be a list of values, got {values!r}")
        out.append((str(key), [_text(v) for v in values]))
    return out


def check(grid: list[tuple[str, list[str]]]) -> None:
    """One line for a grid that cannot be run as written (the settings themselves are checked by config.load)."""
    if not grid:
        raise UserError("nothing to sweep: give GRID=\"key=v1,v2 ...\" or a sweep.grid section in the recipe")
    keys = [k for k, _ in grid]
    for key, values in grid:
        if keys.count(key) > 1:
            raise UserError(f"grid key {key} is given twice; list all its values once: {key}=v1,v2")
        if key == "run_name" or key.split(".")[0] == "sweep":
            raise UserError(f"grid key {key}: the sweep sets run names itself and cannot sweep its own settings")
        if changes_examples(key):
            raise UserError(f"grid key {key} changes the prepared val/test examples, and a sweep compares runs on "
                            f"the same ones; give it to every run instead (ARGS=\"--set {key}=...\")")
        if not values or "" in values or len(set(values)) < len(values):
            raise UserError(f"grid key {key}: values {','.join(values)!r} must be non-empty and different")
        for v in values:
            if not _VALUE.fullmatch(v):
                raise UserError(f"grid value {key}={v!r}: use letters, digits and . _ + - / : only (no spaces, "
                                f"quotes or lists)")


def plan(recipe: str, base_sets: list[str], tiny: bool, grid_text: str | None, force: bool) -> Plan:
    """Every combination named and loaded as a recipe (one line for the first that fails), within sweep.max_runs
    unless forced."""
    base = config.load(recipe, base_sets, tiny)
    grid = parse_grid(grid_text) if grid_text else from_recipe(base.sweep.grid)
    check(grid)
    p = Plan(base.run, recipe, tiny, list(base_sets) + val_sets(base), grid)
    for combo in itertools.product(*(values for _, values in grid)):
        setting = tuple(zip((k for k, _ in grid), combo))
        p.runs.append(Run(paths.sweep_run_name(base.run, list(setting)), setting))
    names = [r.name for r in p.runs]
    if len(set(names)) < len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two combinations get the run name {clash}; give values that differ in letters or digits")
    if len(p.runs) > base.sweep.max_runs and not force:
        raise UserError(f"{p.describe()}, more than sweep.max_runs={base.sweep.max_runs}; run it with FORCE=1 "
                        f"(or --force) or make the grid smaller")
    for r in p.runs:
        try:
            p.cfgs[r.name] = config.load(recipe, p.base_sets + r.sets, tiny)
        except config.ConfigError as e:
            raise UserError(f"sweep run {r.name} ({' '.join(r.sets[:-1])}): {e}") from None
    return p


def val_sets(base: config.Config) -> list[str]:
    """The --set that gives every run sweep.val_size val examples (data.val_extra on top of data.val_size)."""
    want, d = base.sweep.val_size, base.data
    if want is None:
        return []
    if not isinstance(d.val_size, int):
        raise UserError(f"sweep.val_size={want} needs data.val_size as a count of examples, got {d.val_size}")
    extra = max(0, want - d.val_size) if d.val_extra == 0 else d.val_extra  # a data.val_extra given is kept
    return [f"data.val_extra={extra}"] if extra else []


def seed_base_answers(p: Plan, run: Run) -> None:
    """Copy a finished sibling's base-model answers into a run that has none: its cache key (weights, prompts,
    decoding settings) decides whether eval uses them, so a sweep generates base answers once, not once per run."""
    dest = paths.RunPaths(run.name).base_cache
    if dest.exists():
        return
    for other in p.runs:
        src = paths.RunPaths(other.name).base_cache
        if other.name != run.name and src.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            return


def make_command(p: Plan, run: Run, dry_run: bool = False) -> list[str]:
    """`make all` for one run: the recipe, tiny mode and the --set items of the base flags and the combination."""
    args = " ".join(f"--set {s}" for s in p.base_sets + run.sets)
    return ["make", "-C", str(paths.REPO), *(["-n"] if dry_run else []), "--no-print-directory", "all",
            f"RECIPE={p.recipe}", f"PY={sys.executable}", *(["TINY=1"] if p.tiny else []), f"ARGS={args}"]


def make_run(p: Plan, run: Run, i: int) -> bool:
    """Make one run; False when it was already up to date (nothing ran). A failed run stops the sweep in one line."""
    dry = subprocess.run(make_command(p, run, dry_run=True), capture_output=True, text=True)
    if dry.returncode == 0 and "scripts/" not in dry.stdout:  # make would run no step
        log.info("[%d/%d] %s: up to date", i, len(p.runs), run.name)
        return False
    log.info("[%d/%d] %s: %s", i, len(p.runs), run.name, " ".join(run.sets[:-1]))
    seed_base_answers(p, run)
    rc = subprocess.run(make_command(p, run), stdout=sys.stderr).returncode
    if rc != 0:
        raise UserError(f"sweep run {run.name} failed (make exited {rc}); its step logs are in "
                        f"{paths.RunPaths(run.name).logs}; run make sweep again to go on from there")
    return True
