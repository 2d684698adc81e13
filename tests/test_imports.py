"""The import graph of ``lit_lora/``, counting the imports inside functions too (an import moved into a
function to dodge a cycle at load time still ties the modules together): no cycle (issue 19), and the
wings depend in one direction (issue 34): data, models and inference never import training, the
commands or the plugin callbacks; the after-training commands never import one another."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import PACKAGE, ROOT, import_graph


def test_lit_lora_does_not_import_the_plugin_package():
    """The plugin callbacks (``callbacks/``, installed as ``lit_lora.callbacks``) plug into lit-lora;
    lit-lora itself must not need them, under either name."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            plugin = ("callbacks", "lit_lora.callbacks")
            assert not any(n in plugin or n.startswith(tuple(f"{p}." for p in plugin)) for n in names), path


# The wings that sit below the commands: they serve training, the apps, export and serve alike.
LOWER_WINGS = ("data", "models", "inference", "rewards")
# What the lower wings never import: the run, the commands and the modules that start them.
UPPER = (
    "training",
    "apps",
    "export",
    "serve",
    "loggers",
    "cli",
    "train",
    "merge",
    "generate",
    "evaluate",
    "compare",
)
APPS = ("apps", "export", "serve")


def wing(module: str) -> str:
    return module.split(".")[0]


def wrong_direction(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The edges ``(module, imported)`` that break the wings' direction (module docstring)."""
    wrong = []
    for module, deps in graph.items():
        for dep in deps:
            lower_reaches_up = wing(module) in LOWER_WINGS and wing(dep) in UPPER
            app_to_app = module.startswith("apps.") and dep.startswith("apps.")
            across_apps = wing(module) in APPS and wing(dep) in APPS and wing(dep) != wing(module)
            if lower_reaches_up or app_to_app or across_apps:
                wrong.append((module, dep))
    return sorted(wrong)


def test_the_direction_finder_finds_a_wrong_edge():
    graph = {"data.rows": {"training.run"}, "apps.merge": {"apps.evaluate"}, "export.exporter": {"apps.merge"},
             "training.run": {"data.rows"}, "apps.evaluate": {"models.builder"}}  # fmt: skip
    assert wrong_direction(graph) == [
        ("apps.merge", "apps.evaluate"), ("data.rows", "training.run"), ("export.exporter", "apps.merge")
    ]  # fmt: skip


def test_the_wings_depend_in_one_direction():
    graph = import_graph()
    assert {"data.rows", "models.builder", "inference.scoring", "apps.merge", "training.run"} <= set(graph)
    assert wrong_direction(graph) == []


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
    assert len(graph) > 30 and graph["training.run"] and graph["speedups"], "the graph covers the package"
    assert "speedups.attention" in graph["training.module"], "subpackage modules are nodes of their own"
    assert cycles(graph) == [], {m: sorted(graph[m]) for c in cycles(graph) for m in c}


@pytest.mark.parametrize("leaf", ["process", "network"])
def test_the_process_and_network_facts_import_nothing_of_lit_lora(leaf):
    """``lit_lora.process`` (rank, memory) and ``lit_lora.network`` (hub reachability) are leaves every
    module may use."""
    assert import_graph()[leaf] == set() and import_graph()["console"] == set()
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, lit_lora.{leaf}; "
         "print(sorted(m for m in sys.modules if m.startswith('lit_lora.')))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The package itself imports lit_lora.console first (warning filters before any library imports).
    assert done.stdout.strip() == f"['lit_lora.console', 'lit_lora.{leaf}']"
