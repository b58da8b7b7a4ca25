"""The modules of dirge form layers: no import cycle, counting imports made inside functions too.

A lazy import hides a cycle from Python at import time but not from the design: the store that
imports the pipeline that imports the sources that import the store cannot be changed one piece at a
time. Imports under ``if TYPE_CHECKING:`` are only for the type checker and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "dirge"


def module_names() -> dict[str, Path]:
    """Every module under src/dirge by dotted name (a package by its own name, for its __init__)."""
    out: dict[str, Path] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth (functions, methods, try blocks), minus TYPE_CHECKING ones."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dirge modules ``name`` imports. ``from X import Y`` counts Y when Y is a module, else X.
    Importing a.b.c also runs a and a.b's __init__, but Python copes with that (they are already
    being initialised), so only the module named is an edge, as import linters count it."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # Relative to the package: for a module, its parent; for a package, itself.
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        for target in targets:
            while target and target not in modules:  # import a.b.c of a name inside a.b: the module a.b
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "dirge.unpack" in graph and "dirge.cache" in graph["dirge.bases"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_fsutil_is_the_bottom_layer() -> None:
    """Shared filesystem helpers import nothing of dirge but the exceptions, so anyone may use them."""
    assert import_graph()["dirge.fsutil"] <= {"dirge.errors"}


def test_the_store_only_stores() -> None:
    """The cache knows nothing of resolving, applying, sources or sessions."""
    graph = import_graph()
    reach: set[str] = set()
    todo = ["dirge.cache"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    banned = {m for m in reach if m in ("dirge.unpack", "dirge.bases", "dirge.variants")
              or m.startswith(("dirge.sources", "dirge.session", "dirge.apply"))}
    assert not banned, f"dirge.cache depends on {sorted(banned)}"


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    """The walk itself: relative, function-level and TYPE_CHECKING imports are resolved as meant."""
    pkg = tmp_path / "dirge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
                                      "from ..c import thing\n")
    (pkg / "c.py").write_text("import dirge.a\n")
    modules = {n: p for n, p in {"dirge": pkg / "__init__.py", "dirge.a": pkg / "a.py", "dirge.c": pkg / "c.py",
                                 "dirge.sub": pkg / "sub" / "__init__.py",
                                 "dirge.sub.b": pkg / "sub" / "b.py"}.items()}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["dirge.a"] == {"dirge.sub.b"}
    assert graph["dirge.sub.b"] == {"dirge.c"}  # the TYPE_CHECKING import is not an edge
    assert find_cycle(graph) == ["dirge.a", "dirge.sub.b", "dirge.c", "dirge.a"]
