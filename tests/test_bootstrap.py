"""A newcomer's machine: the README's commands from a Python with nothing installed. Make's parse step needs only the
standard library, PyYAML and python-dotenv; a Python that cannot install (no pip, PEP 668) gets the project's own
venv; a parse step that answers nothing stops Make in one line, never an empty path; every third-party import is
declared where `make install` reads it."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

from common.core import bootstrap, paths, stamps
from common.shipping import llamacpp

HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: FT_TEST_HIDE makes a module look uninstalled

# What Make's parse step may import: a new machine has only these before `make install` ran.
PARSE_ALLOWED = set(sys.stdlib_module_names) | {"yaml", "_yaml", "dotenv", "common"}
BLOCKER = textwrap.dedent("""
    import sys, importlib.abc
    allowed = set(sys.argv[1].split(","))
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in allowed:
                raise ImportError(f"not installed on a new machine: {name}")
            return None
    sys.meta_path.insert(0, Block())
    from common.core import stamps
    for recipe in sys.argv[2].split(","):
        for tiny in ([], ["--tiny"]):
            assert stamps.main(["--recipe", recipe, *tiny, "--write"]) == 0, recipe
    print("loaded:", ",".join(sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))))
    print("stages:", ",".join(sorted({m.split(".")[1] for m in sys.modules if m.startswith("common.")})))
""")


def _parse_step(allowed: set[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(sorted(allowed)), ",".join(paths.recipe_names())],
                          cwd=REPO, env=env, capture_output=True, text=True)


def test_makes_parse_step_reads_every_recipe_with_the_standard_library_pyyaml_and_dotenv_alone(tmp_path):
    """Every recipe (tiny or not) is validated and its stamps written with any other import refused, as on a machine
    where `make install` has not run yet; the task modules leave the evaluation, model and training stages alone."""
    p = _parse_step(PARSE_ALLOWED, tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    stages = p.stdout.split("stages:")[1].split()[0].split(",")
    assert set(stages) <= {"core", "data", "tasks"}, stages
    assert (tmp_path / "outputs" / "smollm2-tiny" / ".stamps" / "train.json").exists()


def test_the_import_blocker_refuses_what_it_is_told(tmp_path):
    """The blocker above is real: refusing a module the parse step needs (PyYAML) fails it."""
    p = _parse_step(PARSE_ALLOWED - {"yaml", "_yaml"}, tmp_path)
    assert p.returncode != 0 and "not installed on a new machine: yaml" in p.stderr


# ------------------------------------------------------------------------------------------------- the bootstrap
def test_a_python_that_can_install_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(bootstrap, "can_install", lambda: None)
    assert bootstrap.choose(tmp_path / ".venv") == sys.executable
    assert not (tmp_path / ".venv").exists()


def test_offline_takes_the_python_as_it_is_and_never_makes_a_venv(monkeypatch, tmp_path):
    """FT_OFFLINE=1 (the borrowed GPU: a system Python, no package index): no venv, no pip; one line when the
    recipe reader's packages are missing."""
    monkeypatch.setattr(bootstrap, "can_install", lambda: "is managed by the system (PEP 668)")
    assert bootstrap.choose(tmp_path / ".venv", offline=True) == sys.executable
    monkeypatch.setattr(bootstrap, "has_parse_packages", lambda: False)
    with pytest.raises(SystemExit, match="FT_OFFLINE=1 installs nothing"):
        bootstrap.choose(tmp_path / ".venv", offline=True)
    assert not (tmp_path / ".venv").exists()


def test_no_pip_and_pep_668_are_told_apart(monkeypatch, tmp_path):
    import importlib.util
    import sysconfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real(n, *a))
    assert bootstrap.can_install() == "has no pip"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    (tmp_path / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path))
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)  # not a venv: the marker applies
    assert "PEP 668" in bootstrap.can_install()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))  # inside a venv pip installs whatever the marker says
    assert bootstrap.can_install() is None


def _repo_copy(dest: Path) -> Path:
    """The files Make reads at parse time and plans with, in a folder of their own (no outputs, no .venv)."""
    dest.mkdir()
    for name in ("Makefile", "requirements.txt", "common", "recipes", "scripts"):
        src = REPO / name
        (shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, dest / name))
    return dest


def _pythons(tmp_path: Path) -> list:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    out = [pytest.param(bare / "bin" / "python3", id="venv-without-pip")]
    system = Path("/usr/bin/python3")
    stdlib = subprocess.run([str(system), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True).stdout.strip() if system.exists() else ""
    if stdlib and (Path(stdlib) / "EXTERNALLY-MANAGED").exists():
        out.append(pytest.param(system, id="pep668-system-python"))
    return out


@pytest.mark.e2e
def test_a_python_that_cannot_install_gets_the_projects_venv_and_clean_stays_inside(tmp_path):
    """`make -n all PY=<a venv without pip>` (and the system's PEP 668 Python where there is one): Make makes
    .venv itself, says so, and plans every step with it; `make -n clean-all` then names only paths in the checkout."""
    for param in _pythons(tmp_path):
        python = param.values[0]
        repo = _repo_copy(tmp_path / f"repo-{param.id}")
        env = {k: v for k, v in os.environ.items() if k not in ("FT_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
        p = subprocess.run(["make", "-n", "all", f"PY={python}"], cwd=repo, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "creating the project's own virtual environment" in p.stderr, param.id
        venv_py = repo / ".venv" / "bin" / "python"
        assert f"{venv_py} scripts/01_prepare.py --recipe smollm2" in p.stdout, p.stdout
        assert f"done: {repo}/outputs/smollm2/eval/report.md" in p.stdout
        q = subprocess.run(["make", "-n", "clean-all"], cwd=repo, env=env, capture_output=True, text=True)
        assert q.returncode == 0, q.stderr[-2000:]
        named = re.findall(r"(?:rm -rf --|find) '([^']+)'", q.stdout)
        assert named and all(Path(n).is_relative_to(repo) for n in named), q.stdout
        assert "creating" not in q.stderr  # the second make finds .venv and uses it silently


def _make_n(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HOOKS), **env_extra}
    return subprocess.run(["make", "-n", f"PY={sys.executable}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)


def test_a_parse_step_that_answers_nothing_stops_make_in_one_line(tmp_path):
    """The recipe reader crashing (here: common.core.paths made unimportable) leaves Make without paths: it stops
    with one line and exit 2, plans no step and names no path to delete."""
    for goal in ("all", "clean-all"):
        p = _make_n(goal, FT_HOME=str(tmp_path), FT_TEST_HIDE="common.core.paths")
        assert p.returncode == 2, p.stdout
        assert "gave no usable artifact root" in p.stderr.strip().splitlines()[-1]
        assert "done:" not in p.stdout and "rm -rf" not in p.stdout and "find " not in p.stdout


def test_the_filesystem_root_is_never_the_artifact_root():
    p = _make_n("clean-all", FT_HOME="/")
    assert p.returncode == 2 and "is the filesystem root" in p.stderr and "rm -rf" not in p.stdout


def test_env_json_from_another_python_installs_again(tmp_path, monkeypatch):
    """A new venv with the old outputs/env.json (another prefix, or the same path made again without the packages):
    Make must not take the new Python for an installed one, and installs again without retraining."""
    import importlib.util

    monkeypatch.setenv("FT_HOME", str(tmp_path))
    assert stamps.env_elsewhere() is False  # no env.json yet: make install runs anyway
    (tmp_path / "outputs").mkdir()
    for recorded, stale in ((sys.prefix, False), (str(tmp_path / "another-venv"), True), (None, False)):
        paths.env_json().write_text(json.dumps({"prefix": recorded} if recorded else {}))
        assert stamps.env_elsewhere() is stale, recorded
    paths.env_json().write_text(json.dumps({"prefix": sys.prefix}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    assert stamps.env_elsewhere() is True  # .venv deleted and made again: same prefix, nothing installed
    monkeypatch.setattr(importlib.util, "find_spec", real)
    for recorded, installs in ((sys.prefix, False), ("/another-venv", True)):
        paths.env_json().write_text(json.dumps({"prefix": recorded}))
        p = _make_n("all", FT_HOME=str(tmp_path), PYTHONPATH="")
        assert p.returncode == 0, p.stderr[-2000:]
        assert ("scripts/00_install.py" in p.stdout) is installs, p.stdout


def test_a_run_path_outside_the_artifact_root_stops_make(tmp_path):
    """`make clean OUT_DIR=/etc` (a path variable given on the command line) is refused before anything runs."""
    p = _make_n("clean", "OUT_DIR=/etc", FT_HOME=str(tmp_path), PYTHONPATH="")
    assert p.returncode == 2 and "not a path under" in p.stderr and "rm -rf" not in p.stdout


def test_export_and_test_install_llama_cpp_first(tmp_path):
    """`make export` and `make test` run the llama.cpp installer before anything else of theirs (a machine where
    `make llamacpp` never ran); it is order-only, so it never makes a finished export re-run."""
    for goal, then in (("export", "scripts/06_export.py"), ("test", "-m pytest")):
        p = _make_n(goal, "RECIPE=smollm2", "TINY=1", FT_HOME=str(tmp_path), PYTHONPATH="")
        assert p.returncode == 0, p.stderr[-2000:]
        lines = p.stdout.splitlines()
        first = next(i for i, line in enumerate(lines) if "scripts/00_install.py --llamacpp" in line)
        assert first < next(i for i, line in enumerate(lines) if then in line), p.stdout
    assert "| llamacpp" in (REPO / "Makefile").read_text().split("$(EXPORTED):", 1)[1].splitlines()[0]


def test_the_llama_cpp_build_shows_its_progress_every_ten_percent():
    lines = [f"[{i}/40] /usr/bin/g++ -c ggml.c\n" for i in range(1, 41)] + ["Successfully built\n"]
    shown = list(llamacpp.progress(iter(lines)))
    assert [s.split("%")[0].strip() for s in shown] == ["2", "10", "20", "30", "40", "50", "60", "70", "80", "90",
                                                        "100"], shown


# ------------------------------------------------------------------------------------ every import is declared
# Installed by something else than requirements.txt, each named by what installs it (checked below).
INSTALLED_OTHERWISE = {"torch": "scripts/00_install.py TORCH_PIN", "llama_cpp": "make llamacpp (llamacpp.PACKAGE)"}
# Optional GPU paths, imported only after importlib.util.find_spec found them (common/training/plan.py says how).
OPTIONAL = {"liger_kernel"}
LOCAL = {"common", "scripts", "conftest", "__future__"}


def third_party_imports(files: list[Path], root: Path = REPO) -> dict[str, str]:
    """{top-level module: first file importing it} for every import that is neither standard library nor this repo."""
    out: dict[str, str] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL:
                    out.setdefault(top, str(f.relative_to(root)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> set[str]:
    return {_norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", text, re.M)}


def undeclared(imports: dict[str, str], declared: set[str]) -> list[str]:
    dists = metadata.packages_distributions()
    bad = []
    for module, where in sorted(imports.items()):
        if module in INSTALLED_OTHERWISE or module in OPTIONAL:
            continue
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & declared:
            bad.append(f"{module} ({where}; distribution {', '.join(sorted(names))})")
    return bad


def test_every_third_party_import_is_declared_in_requirements():
    files = sorted(p for d in ("common", "scripts", "tests") for p in (REPO / d).rglob("*.py"))
    imports = third_party_imports(files)
    assert {"numpy", "scipy", "yaml", "torch"} <= set(imports)  # the scan sees the imports that matter
    declared = requirement_names((REPO / "requirements.txt").read_text())
    assert undeclared(imports, declared) == []
    install = (REPO / "scripts" / "00_install.py").read_text()
    assert 'TORCH_PIN = "torch==' in install and llamacpp.PACKAGE == "llama-cpp-python"


def test_an_undeclared_import_is_caught(tmp_path):
    """The check above fails on what issue 39 found: scipy imported, not declared."""
    (tmp_path / "m.py").write_text("import numpy as np\nfrom scipy import sparse\nimport json\n"
                                   "from common import core\n")
    imports = third_party_imports([tmp_path / "m.py"], tmp_path)
    assert imports == {"numpy": "m.py", "scipy": "m.py"}
    assert undeclared(imports, requirement_names("numpy>=2\n")) == ["scipy (m.py; distribution scipy)"]
    assert undeclared(imports, requirement_names("numpy>=2\nscipy>=1.11  # sparse\n")) == []


def test_editing_the_data_file_re_runs_prepare_and_nothing_else_does(tmp_path):
    """The data file is a prerequisite of prepare as Make sees one (its size and time in prepare's stamp): an edited
    file re-runs prepare (and so what follows); an untouched one, a hub id or another step's setting does not."""
    data = tmp_path / "trn.json"
    shutil.copy(REPO / "data" / "sample" / "trn.json", data)
    home = tmp_path / "home"
    env = {"FT_HOME": str(home), "PYTHONPATH": "", "DATA_PATH": str(data)}
    assert _make_n("prepare", **env).returncode == 0  # writes the stamps
    prepared = next(Path(line.split("=", 1)[1]) for line in subprocess.run(
        [sys.executable, "-m", "common.core.stamps", "--recipe", "smollm2"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **env}).stdout.splitlines() if line.startswith("PREPARED="))
    prepared.parent.mkdir(parents=True, exist_ok=True)
    prepared.write_text("{}")
    for f in home.rglob(".stamps/*.json"):  # the stamps older than the prepared split
        os.utime(f, (f.stat().st_atime - 10, f.stat().st_mtime - 10))
    assert "scripts/01_prepare.py" not in _make_n("prepare", **env).stdout
    with open(data, "a", encoding="utf-8") as f:
        f.write("\n")
    p = _make_n("prepare", **env)
    assert p.returncode == 0 and "scripts/01_prepare.py" in p.stdout, p.stderr[-2000:]
    assert stamps.data_fingerprint("hub:owner/name") is None
    assert stamps.data_fingerprint(str(data))[0][1] == data.stat().st_size
