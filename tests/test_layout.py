"""The package's shape: no import cycle between mpff's modules, no private name imported from
another module, and the offline floors (mpff.analysis, mpff.predict) in functions a reader can
take in at once. Reads the source only (ast): nothing is imported."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpff")
#: Floors whose every function fits a screen (the rest of mpff follows as it is reshaped).
SHORT_FUNCTIONS = ("analysis", "predict")
#: The modules the cycle and private-name checks hold for: the offline half and the command line.
#: To become all of mpff once the training half passes them too (today mpff.tvdata imports
#: data's _Raw and _check_labels, and mpff.modelfile the package's __version__ from a function).
CHECKED = ("mpff.analysis", "mpff.predict", "mpff.cli", "mpff.report")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "mpff." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _target(module: str, path: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not path.endswith("__init__.py"):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str) -> list[tuple[str, str | None]]:
    """(mpff module, name taken from it or None) of every import of the module, those inside
    functions and under ``if TYPE_CHECKING`` included: an import deferred to break a cycle is
    still a cycle for the reader."""
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            target = _target(module, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
    return [(m, name) for m, name in out if m in MODULES]


def _checked(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CHECKED)


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(m, p)} for m, p in MODULES.items()}
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            cycle = path[path.index(t):] + [t] if state.get(t) == 1 else []
            if any(_checked(c) for c in cycle):
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_from_another_module():
    found = [f"{m} imports {name} from {t}" for m, p in MODULES.items() for t, name in _imports(m, p)
             if name is not None and name.startswith("_") and not name.startswith("__")
             and (_checked(m) or _checked(t))]
    assert not found, found


@pytest.mark.parametrize("floor", SHORT_FUNCTIONS)
def test_functions_of_the_offline_floors_are_short(floor):
    long = []
    for m, p in MODULES.items():
        if not m.startswith(f"mpff.{floor}"):
            continue
        for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {lines} lines")
    assert not long, long
