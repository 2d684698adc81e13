"""No import cycle inside ``lit_lora/`` (issue 19), counting the imports inside functions too: an import
moved into a function to dodge a cycle at load time still ties the modules together."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "lit_lora"


def import_graph() -> dict[str, set[str]]:
    """``{module: lit_lora modules it imports anywhere in its body}`` for every module of the package."""
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("lit_lora."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "lit_lora":
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lit_lora."))
        graph[name] = (deps & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_lit_lora():
    graph = import_graph()
    assert len(graph) > 20 and graph["train"], "the graph covers the package"
    assert cycles(graph) == [], {m: sorted(graph[m]) for c in cycles(graph) for m in c}


def test_environment_helpers_import_nothing_of_lit_lora():
    """``lit_lora.environment`` is the leaf every module may use (rank, hub reachability)."""
    assert import_graph()["environment"] == set()
    done = subprocess.run(
        [sys.executable, "-c", "import sys, lit_lora.environment; "
         "print(sorted(m for m in sys.modules if m.startswith('lit_lora.')))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['lit_lora.environment']"
