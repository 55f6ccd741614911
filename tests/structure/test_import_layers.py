"""Imports point one way: each engine package imports only from its own layer or the layers below it.

    core -> evaluation, scores, quant, slicing, dropping, llamacpp -> sensitivity, optimize -> export
         -> runs, methods -> viz -> cli

(``docs/architecture.md`` draws it).  The engine never imports Streamlit, ``ui`` or ``pages``; module-level
imports between engine modules form no cycle.  A new upward import fails here with the file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
LAYERS = [["core"], ["evaluation", "scores", "quant", "slicing", "dropping", "llamacpp"], ["sensitivity", "optimize"],
          ["export"], ["runs", "methods"], ["viz"], ["cli", "__main__"]]
LEVEL = {package: i for i, group in enumerate(LAYERS) for package in group}


def _package(path: Path) -> str:
    return path.relative_to(ENGINE).with_suffix("").parts[0]


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _modules() -> list[Path]:
    return [p for p in ENGINE.rglob("*.py") if p.name != "__init__.py" or p.parent != ENGINE]


def test_every_engine_package_is_in_a_layer():
    packages = {_package(p) for p in _modules()}
    assert packages <= set(LEVEL), f"add {sorted(packages - set(LEVEL))} to LAYERS (and docs/architecture.md)"


def test_no_engine_import_points_up():
    upward = []
    for path in _modules():
        mine = LEVEL[_package(path)]
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "engine" and len(parts) > 1 and LEVEL.get(parts[1], -1) > mine:
                upward.append(f"{path.relative_to(ENGINE.parent)} imports {name}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_engine_never_imports_the_dashboard():
    offending = [f"{p.relative_to(ENGINE.parent)}: {name}" for p in _modules() for name in _imports(p)
                 if name.split(".")[0] in ("streamlit", "ui", "pages")]
    assert not offending, offending


def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in _modules():
        module = ".".join(("engine", *path.relative_to(ENGINE).with_suffix("").parts)).removesuffix(".__init__")
        graph[module] = {name for name in _imports(path, top_level_only=True) if name.startswith("engine.")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return trail + [node, target]
            if target in graph and not state.get(target):
                cycle = visit(target, trail + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)
