"""The code stays easy to carry on: common/ is grouped by stage and a stage imports only the stages before it (the
rule below), there is no import circle, every module says its one job in its first line, and no file under common/
or scripts/ grows past 350 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

FILES = sorted([*(REPO / "common").rglob("*.py"), *(REPO / "scripts").glob("*.py")])
MAX_LINES = 350


def common_imports(path: Path) -> set[str]:
    """The common.* modules a file imports, at any level (a function-level import is still a dependency);
    `from common.core import io` names the module common.core.io, not the package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            folder = REPO.joinpath(*node.module.split("."))
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if (folder / f"{a.name}.py").exists() or (folder / a.name / "__init__.py").exists()}
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "common"}
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


# Which stages each stage of common/ may import (besides itself). Data and model know nothing of training;
# evaluation needs no trainer; measurement imports the pipeline and nothing imports measurement back.
STAGES = {
    "core": set(),
    "data": {"core"},
    "model": {"core", "data"},
    "training": {"core", "data", "model"},
    "evaluation": {"core", "data", "model"},
    "tasks": {"core", "data", "evaluation"},
    "shipping": {"core", "data", "model", "evaluation"},
    "measurement": {"core", "data", "model", "training", "evaluation", "shipping", "tasks"},
}
# The one way back: core reads the task registry (common/tasks/__init__.py, which imports nothing of common) to
# validate `task:` and add each task's own settings to the schema.
REGISTRY = "common.tasks"


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


def stage_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        here = stage(mod)
        for dep in sorted(deps):
            there = stage(dep)
            if here is None or there is None or there == here or there in STAGES[here]:
                continue
            if here == "core" and dep == REGISTRY:
                continue
            bad.append(f"{mod} imports {dep}: {here} may import only {', '.join(sorted(STAGES[here])) or 'itself'}")
    return bad


def common_graph() -> dict[str, set[str]]:
    return {module_name(p): {m for m in common_imports(p) if m != module_name(p)} for p in (REPO / "common").rglob("*.py")}


def test_common_is_grouped_by_stage_and_every_module_sits_in_one():
    loose = [p.name for p in (REPO / "common").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a stage package: {loose}"
    packages = {p.parent.name for p in (REPO / "common").glob("*/__init__.py")}
    assert packages == set(STAGES), packages ^ set(STAGES)
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((REPO / "common" / pkg / "__init__.py").read_text()))
        assert doc and len(doc) > 100, f"common/{pkg}/__init__.py should say what the stage does and hands on"


def test_a_stage_imports_only_the_stages_before_it():
    assert stage_violations(common_graph()) == []


def test_the_stage_rule_catches_an_import_against_it():
    graph = {"common.data.prompts": {"common.training.loss"}, "common.training.loss": {"common.data.prompts"},
             "common.core.schema": {"common.tasks"}, "common.core.config": {"common.tasks.xauusd_forecast"},
             "common.shipping.export": {"common.measurement.bench_rows"}}
    assert stage_violations(graph) == [
        "common.core.config imports common.tasks.xauusd_forecast: core may import only itself",
        "common.data.prompts imports common.training.loss: data may import only core",
        "common.shipping.export imports common.measurement.bench_rows: shipping may import only core, data, "
        "evaluation, model"]


def test_every_architecture_has_a_trainer():
    from common.model import arch
    from common.training import trainers

    assert set(arch.ARCHS) == set(trainers.TRAINERS)


def test_no_import_circle_in_common():
    graph = common_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_says_its_job_and_stays_short(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if path.name == "__init__.py" and path.parent.name == "scripts":
        return
    assert doc and len(doc.splitlines()[0]) > 20, f"{path.name}: the first docstring line should say its one job"
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (at most {MAX_LINES}): split it by concern"


def unresolved_common_imports(source: str) -> list[str]:
    """`from common... import name` lines in a code text whose module or name does not exist in the tree."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            folder = REPO.joinpath(*node.module.split("."))
            if not (folder / "__init__.py").exists() and not folder.with_suffix(".py").exists():
                bad.append(node.module)
                continue
            for a in node.names:
                if not ((folder / f"{a.name}.py").exists() or (folder / a.name / "__init__.py").exists()
                        or (folder.with_suffix(".py").exists() and f"def {a.name}" in folder.with_suffix(".py").read_text())):
                    bad.append(f"{node.module}.{a.name}")
    return bad


def test_the_notebook_imports_modules_that_exist():
    import json

    for nb in (REPO / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        code = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
                         for line in code.splitlines())
        assert unresolved_common_imports(code) == [], nb.name
    assert unresolved_common_imports("from common import config") == ["common.config"]
