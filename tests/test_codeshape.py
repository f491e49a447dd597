"""The code's shape (issue 23): no function in pgshell/ longer than 60 lines, so each reads on one screen."""

import ast
from pathlib import Path

import pgshell

LIMIT = 60
ROOT = Path(pgshell.__file__).parent


def long_functions(root: Path, limit: int) -> list[str]:
    """`path:line name (N lines)` of every function or method over `limit` lines, its decorators not counted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_in_pgshell_is_over_60_lines():
    assert long_functions(ROOT, LIMIT) == []


def test_the_check_sees_a_long_function_and_a_long_method(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT - 1))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def fits():\n{body}\n\n\nclass C:\n    def long(self):\n"
                                            + body.replace("    ", "        ") + "\n        return 1\n")
    assert long_functions(tmp_path / "pkg", LIMIT) == [f"pkg/m.py:{LIMIT + 4} long (61 lines)"]
