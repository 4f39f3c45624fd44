"""The package's shape: no import cycle between mpff's modules, and no private name (``_x``)
used outside the module that defines it. Read from the source (every import counts, also the
ones deferred into functions), so a cycle hidden behind a local import fails too."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpff")


def _modules(package: str = PACKAGE) -> dict[str, str]:
    """{dotted name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), os.path.dirname(package))[:-3]
                parts = rel.split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(root, name)
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target or ""


class _Imports(ast.NodeVisitor):
    """Every mpff module a module imports, and the private names it takes from them."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.edges: set[str] = set()
        self.aliases: dict[str, str] = {}  # local name -> mpff module
        self.private: list[str] = []

    def _own(self, name: str) -> str | None:
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        return name or None

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if (own := self._own(a.name)) is not None:
                self.edges.add(own)
                self.aliases[a.asname or a.name] = own

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _resolve(self.module, self.is_package, node.level, node.module)
        if self._own(source) is None:
            return
        for a in node.names:
            full = f"{source}.{a.name}"
            if full in self.known:  # `from . import report`: a module
                self.edges.add(full)
                self.aliases[a.asname or a.name] = full
                continue
            self.edges.add(self._own(source))
            if a.name.startswith("_") and not a.name.startswith("__"):
                self.private.append(f"{self.module} imports {a.name} from {source}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if (isinstance(node.value, ast.Name) and node.value.id in self.aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            self.private.append(f"{self.module} uses {self.aliases[node.value.id]}.{node.attr}")
        self.generic_visit(node)


def _scan(package: str = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules(package)
    graph, private = {}, []
    for name, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        v = _Imports(name, path.endswith("__init__.py"), set(mods))
        v.visit(tree)
        graph[name] = {e for e in v.edges if e != name}
        private += v.private
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own modules is how packages are built, not a cycle."""
    return {m: {e for e in es if not (e.startswith(m + ".") and m != "mpff")} for m, es in graph.items()}


def test_no_import_cycle():
    graph, _ = _scan()
    graph = {m: {e for e in es if e != "mpff"} for m, es in _package_edges(graph).items()}
    assert _cycles(graph) == []


def test_no_private_name_crosses_a_module():
    _, private = _scan()
    assert private == []


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The scanner itself: a made-up package with both faults is caught."""
    pkg = tmp_path / "mpff"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b._hidden\n")
    (pkg / "b.py").write_text("from .a import f\n_hidden = 1\n")
    (pkg / "c.py").write_text("from .b import _hidden\n")
    graph, private = _scan(str(pkg))
    assert _cycles({m: {e for e in es if e != "mpff"} for m, es in graph.items()}) == [["mpff.a", "mpff.b"]]
    assert sorted(private) == ["mpff.a uses mpff.b._hidden", "mpff.c imports _hidden from mpff.b"]


@pytest.mark.parametrize("limit", [80])
def test_no_function_is_longer_than(limit):
    """Long functions hide their steps; split them into named ones."""
    long = []
    for name, path in _modules().items():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit + 5:  # "about 80": a docstring's worth of slack
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []
