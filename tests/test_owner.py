"""Issue 23, the session's one owner: nothing outside session/core.py assigns to a Session; one `Run` answers the
position, the trainer read from and the evaluation data; `Session.fork` and one checkpoint resolver (`eval
--checkpoint step:N` as `fork` takes it); one reader of the session file."""

import ast
from pathlib import Path

import pytest

from conftest import ROOT, new_session, run, train_to_end

PACKAGE = ROOT / "pgshell"
CORE = PACKAGE / "session" / "core.py"
SESSION_NAMES = {"s", "session", "sess"}  # how a Session is bound: s.X, session.X, self.session.X, self.s.X, ...


def _session_attributes() -> set[str]:
    """Every attribute Session has: those its methods assign (self.X = ...), its methods and properties."""
    tree = ast.parse(CORE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session")
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


def _is_session(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in SESSION_NAMES
    return isinstance(node, ast.Attribute) and node.attr in ("session", "s")


def _writes_to_a_session(tree: ast.AST, attributes: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) \
                and _is_session(node.value) and node.attr in attributes:
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args and _is_session(node.args[0]):
                yield node.lineno, ast.unparse(node)
            # s.__dict__.update(...), vars(s).update(...), s.__dict__[k] = ... (below)
            if isinstance(f, ast.Attribute) and f.attr in ("update", "setdefault", "__setitem__", "pop"):
                owner = f.value
                if (isinstance(owner, ast.Attribute) and owner.attr == "__dict__" and _is_session(owner.value)) or \
                        (isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "vars"
                         and owner.args and _is_session(owner.args[0])):
                    yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "__dict__" and _is_session(owner.value)) or \
                    (isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "vars" and owner.args
                     and _is_session(owner.args[0])):
                yield node.lineno, ast.unparse(node)


def test_no_module_outside_session_core_assigns_to_a_session():
    attributes = _session_attributes()
    assert {"notify", "target", "uid", "auto_named", "trainer", "config"} <= attributes  # the check sees them
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file == CORE:
            continue
        for line, what in _writes_to_a_session(ast.parse(file.read_text()), attributes):
            found.append(f"{file.relative_to(ROOT)}:{line}: {what}")
    assert found == []


def test_the_ownership_check_finds_each_kind_of_write():
    """The check itself: each way of writing to a session from outside is found, reads are not."""
    code = ("s.target = None\nself.session.notify = f\nsess.uid += 'x'\nsetattr(s, 'dirty', True)\n"
            "s.__dict__.update(x=1)\nvars(session)['name'] = 'n'\ndel s.trainer\n"
            "x = s.target\ns.saver.latest = p\nother.target = 1\n")
    found = [line for line, _ in _writes_to_a_session(ast.parse(code), _session_attributes())]
    assert found == [1, 2, 3, 4, 5, 6, 7]
