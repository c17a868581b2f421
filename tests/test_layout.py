"""The code stays easy to carry on: no import circle in common/, every module says its one job in its first line,
and no file under common/ or scripts/ grows past 350 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

FILES = sorted([*(REPO / "common").rglob("*.py"), *(REPO / "scripts").glob("*.py")])
MAX_LINES = 350


def common_imports(path: Path) -> set[str]:
    """The common.* modules a file imports, at any level (a function-level import is still a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            if node.module == "common":
                out |= {f"common.{a.name}" for a in node.names}
            else:
                out.add(node.module)
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


def test_no_import_circle_in_common():
    graph = {module_name(p): {m for m in common_imports(p) if m != module_name(p)}
             for p in (REPO / "common").rglob("*.py")}
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
