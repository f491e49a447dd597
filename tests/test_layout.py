"""The code's layout: three layers importing one way, no import cycle inside a layer, one name per module.

Read from the source with `ast` (nothing is imported): every import pgshell's modules make, at module level and inside
functions. Imports under `if TYPE_CHECKING:` run only for type checkers: they count for the layering, not for cycles.
"""

import ast
import functools
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pgshell"
LAYERS = ("pgshell.engine", "pgshell.session", "pgshell.shell")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, with_type_checking: bool):
    """(line, imported name) for every import in the file; names are absolute (`pgshell.engine.data.images`,
    `torch.nn`), a `from X import y` naming module X.y when y is a module, else X."""
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = _tree(path)
    skipped = set()
    if not with_type_checking:
        for node in ast.walk(tree):
            if _is_type_checking(node):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                full = f"{source}.{alias.name}"
                yield node.lineno, full if full in FILES else source


@functools.cache
def _edges(with_type_checking: bool) -> dict[str, set[str]]:
    """pgshell module -> the pgshell modules it imports."""
    graph = {}
    for module, path in FILES.items():
        targets = set()
        for _, name in _imports(path, with_type_checking):
            while name not in FILES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in FILES and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _lazy_package(module: str) -> bool:
    """A package whose __init__ re-exports its modules' names on first use (module __getattr__)."""
    path = FILES[module]
    return path.name == "__init__.py" and any(
        isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in _tree(path).body)


def test_the_import_graph_sees_the_known_edges():
    graph = _edges(with_type_checking=False)
    assert "pgshell.engine.train.events" in graph["pgshell.engine.train.loop"]  # a module-level relative import
    assert "pgshell.engine.batches.features" in graph["pgshell.engine.batches.choice"]  # one inside a function
    assert "pgshell.session.core" in graph["pgshell.session"]  # a package's own __init__
    assert len(FILES) > 60


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_cycle_inside_a_layer(layer):
    graph = _edges(with_type_checking=False)
    inside = {m: {t for t in targets if _layer(t) == layer} for m, targets in graph.items() if _layer(m) == layer}
    assert _cycles(inside) == []


@pytest.mark.parametrize("layer", LAYERS)
def test_modules_import_their_own_layer_by_module_not_through_a_lazy_package(layer):
    """A lazy package's names reach its modules through `__getattr__`, which the import graph cannot see: inside a
    layer, a module names the module it needs, so the cycle check above sees every edge."""
    graph = _edges(with_type_checking=True)
    through = sorted((m, t) for m, targets in graph.items() if _layer(m) == layer
                     for t in targets if _layer(t) == layer and _lazy_package(t) and not m.startswith(t + "."))
    assert through == []


def test_imports_go_one_way_shell_session_engine():
    below = {"pgshell.engine": ("pgshell.session", "pgshell.shell"), "pgshell.session": ("pgshell.shell",)}
    wrong = []
    for module, targets in _edges(with_type_checking=True).items():
        for upper in below.get(_layer(module), ()):
            wrong += [(module, t) for t in targets if _layer(t) == upper]
    assert wrong == []


def test_the_engine_never_imports_cmd2_or_prompt_toolkit():
    found = [(module, line, name) for module, path in FILES.items() if _layer(module) == "pgshell.engine"
             for line, name in _imports(path, with_type_checking=True)
             if name.split(".")[0] in ("cmd2", "prompt_toolkit")]
    assert found == []


def test_no_two_modules_share_a_file_name():
    counts = Counter(p.name for p in FILES.values() if p.name != "__init__.py")
    assert sorted(name for name, n in counts.items() if n > 1) == []
