"""The layering the README's code map promises, checked on the source: no import circles, runtimes
and exporters independent of each other, no library module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# Folder on disk -> package name (the pyproject package-dir mapping).
PACKAGES = {
    "gpts_edge": "gpts_edge",
    "export": "gpts_edge.export",
    "runtimes": "gpts_edge.runtimes",
    "training": "gpts_edge.training",
}
MAX_LINES = 600
# Standalone by design: loaded by transformers with trust_remote_code, may not import gpts_edge.
EXEMPT_FROM_SIZE = {"gpts_edge.export.hf_remote.modeling_gpts"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def test_no_module_imports_itself_back_through_any_chain() -> None:
    graph = _graph()
    # The walk sees function-level imports too (api opens runtimes lazily).
    assert {"gpts_edge.runtimes.onnx", "gpts_edge.runtimes.gguf"} <= graph["gpts_edge.api"]
    # Package __init__ files only re-export; an edge to a package is not an edge to its modules.
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    graph = {m: deps - packages for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_runtimes_and_exporters_do_not_lean_on_each_other() -> None:
    graph = _graph()
    for mod, deps in graph.items():
        if mod.startswith("gpts_edge.runtimes"):
            bad = {d for d in deps if d.startswith(("gpts_edge.export", "gpts_edge.training"))}
            assert not bad, f"{mod} imports {sorted(bad)}"
            assert not {"gpts_edge.api", "gpts_edge.parity", "gpts_edge.cli"} & deps, mod
        if mod.startswith("gpts_edge.export"):
            bad = {d for d in deps if d.startswith(("gpts_edge.runtimes", "gpts_edge.training"))}
            assert not bad, f"{mod} imports {sorted(bad)}"
            assert not {"gpts_edge.api", "gpts_edge.parity", "gpts_edge.cli"} & deps, mod


def test_the_bottom_layer_imports_nothing_above_it() -> None:
    graph = _graph()
    bottom = {"gpts_edge.constants", "gpts_edge.errors", "gpts_edge.fileio"}
    for mod in bottom:
        assert graph[mod] <= bottom, f"{mod} imports {sorted(graph[mod] - bottom)}"


def test_no_library_module_is_a_grab_bag_of_over_600_lines() -> None:
    big = {
        m: n
        for m, p in _modules().items()
        if m not in EXEMPT_FROM_SIZE and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, big
