"""No import cycle inside ``lit_lora/`` (issue 19), counting the imports inside functions too: an import
moved into a function to dodge a cycle at load time still ties the modules together."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "lit_lora"


def _module_name(path) -> str:
    """``builder`` for lit_lora/builder.py, ``speedups.attention`` for lit_lora/speedups/attention.py,
    ``speedups`` for its ``__init__.py``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The lit_lora modules one import statement names (``from lit_lora.x import y`` names ``x.y`` when
    that is a module, else ``x``)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lit_lora":
        base = node.module.removeprefix("lit_lora").lstrip(".")
        names = {f"{base}.{a.name}".lstrip(".") for a in node.names}
        return {n if n in modules else base for n in names} - {""}
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("lit_lora.") for a in node.names if a.name.startswith("lit_lora.")}
    return set()


def import_graph() -> dict[str, set[str]]:
    """``{module: lit_lora modules it imports anywhere in its body}`` for every module of the package,
    subpackages included."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py") if path.parent.name != "__pycache__"}
    modules = set(paths) - {""}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(paths[name].read_text())):
            deps |= _imported(node, modules)
        graph[name] = (deps & modules) - {name}
    return graph


def test_lit_lora_does_not_import_the_plugin_package():
    """``callbacks`` (top level) plugs into lit-lora; lit-lora itself must not need it."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "callbacks" or n.startswith("callbacks.") for n in names), path


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
    assert len(graph) > 30 and graph["train"] and graph["speedups"], "the graph covers the package"
    assert "speedups.attention" in graph["module"], "subpackage modules are nodes of their own"
    assert cycles(graph) == [], {m: sorted(graph[m]) for c in cycles(graph) for m in c}


def test_environment_helpers_import_nothing_of_lit_lora():
    """``lit_lora.environment`` is the leaf every module may use (rank, hub reachability)."""
    assert import_graph()["environment"] == set() and import_graph()["console"] == set()
    done = subprocess.run(
        [sys.executable, "-c", "import sys, lit_lora.environment; "
         "print(sorted(m for m in sys.modules if m.startswith('lit_lora.')))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The package itself imports lit_lora.console first (warning filters before any library imports).
    assert done.stdout.strip() == "['lit_lora.console', 'lit_lora.environment']"
