"""The package's import graph has no circle, and no itsim import hides inside a function.

Edges are the `import`/`from ... import` statements of every module (type-checking-only imports
excluded: they never run). A circle would mean two stages depend on each other, so data no longer
flows one way; an import inside a function is how circles used to be hidden, so those are listed too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "itsim"
# Imports inside functions that are there for start-up cost, not to dodge a circle (each says why in place).
DEFERRED_OK = {("itsim.score", "itsim.score.ray_job")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The itsim module an imported name lives in (`itsim.model.load_model` -> `itsim.model`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, tree: ast.AST, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported inside functions)."""
    top, inner = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name.startswith("itsim") and (target := _target(name, modules)) and target != module:
                    (inner if in_function else top).add(target)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, inner


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    top, inner = {}, {}
    for name, path in modules.items():
        top[name], inner[name] = _imports(name, ast.parse(path.read_text()), modules)
    return top, inner


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return found


def test_import_graph_has_no_circle_even_counting_imports_inside_functions():
    top, inner = _graph()
    both = {m: top[m] | inner[m] for m in top}
    assert _cycles(both) == []


def test_no_itsim_import_is_deferred_into_a_function_except_for_startup_cost():
    _, inner = _graph()
    deferred = {(m, t) for m, targets in inner.items() for t in targets}
    assert deferred <= DEFERRED_OK, sorted(deferred - DEFERRED_OK)


def test_the_graph_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
