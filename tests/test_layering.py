"""The modules of dirge form layers: no import cycle, counting imports made inside functions too.

A lazy import hides a cycle from Python at import time but not from the design: the store that
imports the pipeline that imports the sources that import the store cannot be changed one piece at a
time. Imports under ``if TYPE_CHECKING:`` are only for the type checker and do not count.

Above the modules, the packages: docs/ARCHITECTURE.md draws which package imports which (the
``imports`` block), and the drawing is checked against the real imports both ways; the pipeline's
packages (oci, store, sources, apply, fsimage, session) are also checked for what they may not reach.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "dirge"
ARCHITECTURE = SRC.parent / "docs" / "ARCHITECTURE.md"


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
    tree = ast.parse(path.read_text(), str(path))
    for node in _imports(tree):
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
            target = _owning_module(target, modules)  # import a.b.c of a name inside a.b: the module a.b
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out | _lazy_imports(name, tree, modules)


def _owning_module(target: str, modules: dict[str, Path]) -> str:
    """``target`` or its nearest enclosing module ("" if none is one of ``modules``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def _lazy_imports(name: str, tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """A package's PEP 562 ``_LAZY = {"attr": ".module", ...}`` (dirge/__init__.py): each module it names
    is imported at run time (by importlib, on first use), so it is an edge like an import statement."""
    out: set[str] = set()
    for node in tree.body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_LAZY"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            for value in node.value.values:
                assert isinstance(value, ast.Constant) and isinstance(value.value, str), "a _LAZY module name"
                out.add(_owning_module(name + value.value, modules))  # ".apply.layer": relative to the package
    return out


@functools.cache  # one walk of the sources for every test here (read only)
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
    assert "dirge.flatten" in graph and "dirge.store.cache" in graph["dirge.bases"]  # the walk sees the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_fsutil_is_the_bottom_layer() -> None:
    """Shared filesystem helpers import nothing of dirge but the exceptions, so anyone may use them."""
    assert import_graph()["dirge.fsutil"] <= {"dirge.errors"}


def reach(graph: dict[str, set[str]], package: str) -> set[str]:
    """Every module that the modules of ``package`` (a package or a module) import, directly or not."""
    found: set[str] = set()
    todo = [m for m in graph if m == package or m.startswith(package + ".")]
    while todo:
        for nxt in graph[todo.pop()] - found:
            found.add(nxt)
            todo.append(nxt)
    return found


BOTTOM = ("dirge.errors", "dirge.fsutil", "dirge.waits")

# What the pipeline's packages may not reach, even through others: each stage knows nothing of the
# stages after it (reference → resolve → fetch → apply → store → session).
NOT_REACHED = {
    # The format and its verification: nothing but the bottom layer.
    "dirge.oci": ("dirge.store", "dirge.sources", "dirge.apply", "dirge.fsimage", "dirge.flatten", "dirge.bases",
                  "dirge.session", "dirge.vm", "dirge.variants", "dirge.config", "dirge.lifecycle"),
    # The store only stores: no resolving, sourcing, applying, sessions or booting.
    "dirge.store": ("dirge.sources", "dirge.apply", "dirge.fsimage", "dirge.flatten", "dirge.bases",
                    "dirge.variants", "dirge.session", "dirge.vm", "dirge.lifecycle", "dirge.verify", "dirge.rootfs"),
    # Sources fetch: the variant builder is handed in, nothing is applied or stored above the store.
    "dirge.sources": ("dirge.variants", "dirge.apply", "dirge.fsimage", "dirge.flatten", "dirge.bases",
                      "dirge.session", "dirge.vm", "dirge.lifecycle", "dirge.verify", "dirge.rootfs"),
    # The merge engine and its sinks see entries, not images, sources or stores.
    "dirge.apply": ("dirge.oci", "dirge.store", "dirge.sources", "dirge.fsimage", "dirge.flatten", "dirge.session",
                    "dirge.vm"),
    "dirge.fsimage": ("dirge.oci", "dirge.store", "dirge.sources", "dirge.flatten", "dirge.bases", "dirge.session",
                      "dirge.vm"),
    # Sessions are made from bases; they never fetch or build one.
    "dirge.session": ("dirge.sources", "dirge.flatten", "dirge.bases", "dirge.variants", "dirge.vm", "dirge.lifecycle",
                      "dirge.rootfs"),
    # The boot files' names: the store's level.
    "dirge.vm.bootcache": ("dirge.sources", "dirge.apply", "dirge.flatten", "dirge.bases", "dirge.session",
                           "dirge.rootfs", "dirge.lifecycle", "dirge.vm.boot"),
}


@pytest.mark.parametrize("package", sorted(NOT_REACHED))
def test_pipeline_packages_know_nothing_after_them(package: str) -> None:
    found = reach(import_graph(), package)
    banned = sorted(m for m in found for b in NOT_REACHED[package] if m == b or m.startswith(b + "."))
    assert not banned, f"{package} depends on {banned}"


def test_the_format_needs_only_the_bottom_layer() -> None:
    """oci/ is the ground everything else stands on: only the exceptions and the cancellable waits."""
    assert {m for m in reach(import_graph(), "dirge.oci") if not m.startswith("dirge.oci")} <= set(BOTTOM)


# The package drawing in docs/ARCHITECTURE.md, checked against the code.

def drawn_imports(text: str) -> tuple[list[str], dict[str, set[str]], set[str]]:
    """The ``imports`` block of ARCHITECTURE.md: its nodes in drawn order, each node's drawn imports, and
    the bottom nodes (``bottom: a b``), which any node imports without drawing it."""
    block = re.search(r"^```imports\n(.*?)^```", text, re.M | re.S)
    assert block, "docs/ARCHITECTURE.md has no ```imports block"
    order: list[str] = []
    edges: dict[str, set[str]] = {}
    bottom: set[str] = set()
    for raw in block.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("bottom:"):
            bottom.update(line.removeprefix("bottom:").split())
            continue
        name, arrow, targets = line.partition("->")
        assert arrow, f"not 'node -> nodes': {raw!r}"
        name = name.strip()
        assert name not in edges, f"{name} drawn twice"
        order.append(name)
        edges[name] = set(targets.split())
    return order, edges, bottom


def node_of(module: str, nodes: set[str]) -> str | None:
    """The drawn node a module belongs to: the longest drawn name that is the module or a package of it
    (``dirge`` is the package's own __init__)."""
    if module == PACKAGE:
        return PACKAGE if PACKAGE in nodes else None
    name = module.removeprefix(PACKAGE + ".")
    best = None
    for node in nodes:
        if (name == node or name.startswith(node + ".")) and (best is None or len(node) > len(best)):
            best = node
    return best


def real_node_imports(graph: dict[str, set[str]], nodes: set[str], bottom: set[str]) -> dict[str, set[str]]:
    """The import graph between drawn nodes (edges to the bottom left out, but the bottom's own kept)."""
    out: dict[str, set[str]] = {n: set() for n in nodes}
    for module, targets in graph.items():
        a = node_of(module, nodes)
        assert a is not None, f"{module} belongs to no node of the drawing in docs/ARCHITECTURE.md"
        for target in targets:
            b = node_of(target, nodes)
            assert b is not None, f"{target} belongs to no node of the drawing in docs/ARCHITECTURE.md"
            if b != a and (b not in bottom or a in bottom):
                out[a].add(b)
    return out


def test_the_package_drawing_is_the_code() -> None:
    """Every real import between packages is drawn, and every drawn one is real."""
    order, drawn, bottom = drawn_imports(ARCHITECTURE.read_text())
    graph = import_graph()
    nodes = set(order)
    assert bottom <= nodes, f"bottom nodes not drawn: {sorted(bottom - nodes)}"
    empty = sorted(n for n in nodes if not any(node_of(m, nodes) == n for m in graph))
    assert not empty, f"drawn but no such module or package: {empty}"
    real = real_node_imports(graph, nodes, bottom)
    missing = sorted(f"{a} -> {b}" for a in order for b in real[a] - drawn[a])
    extra = sorted(f"{a} -> {b}" for a in order for b in drawn[a] - real[a])
    assert not missing and not extra, f"not drawn: {missing}; drawn but not imported: {extra}"


def test_the_package_drawing_is_layered() -> None:
    """The drawing lists nodes bottom-up: a node imports only nodes drawn above it, so the packages form
    layers too (not only the modules) and the order is one a reader can follow."""
    order, drawn, bottom = drawn_imports(ARCHITECTURE.read_text())
    seen: set[str] = set(bottom)
    for name in order:
        upward = sorted(drawn[name] - seen)
        assert not upward, f"{name} imports {upward}, drawn below it"
        seen.add(name)


def test_the_drawing_parser() -> None:
    text = "x\n```imports\n# comment\nbottom: e\ne ->\na -> e  # why\nb -> a\n```\n"
    order, edges, bottom = drawn_imports(text)
    assert order == ["e", "a", "b"] and edges == {"e": set(), "a": {"e"}, "b": {"a"}} and bottom == {"e"}
    nodes = {"dirge", "a", "a.x", "e"}
    assert [node_of(m, nodes) for m in ("dirge", "dirge.a.y", "dirge.a.x.z", "dirge.b")] == ["dirge", "a", "a.x", None]


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
