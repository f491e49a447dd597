"""Every command has help with an example and appears in the README; the examples' plans only use real commands."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest

from pgshell.engine.config import setting_names

from conftest import ROOT, new_app

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = new_app(tmp_path_factory.mktemp("s"))
    yield a
    a.session.close(save=False)


def test_every_command_has_help_with_example_and_is_in_readme(app):
    commands = app.get_visible_commands()
    assert {"models", "load", "data", "freeze", "unfreeze", "set", "show", "train", "pause", "continue", "stop",
            "wait", "eval", "save", "quit", "help"} <= set(commands)
    for name in commands:
        assert f"`{name}" in README, f"command {name} is not documented in README.md"
        parser = app.command_parsers.get(app.get_command_func(name))
        assert parser is not None and parser.description, f"{name} has no help text"
        assert "example:" in (parser.epilog or ""), f"`help {name}` shows no example"


def test_every_setting_is_in_readme():
    table = README[README.index("### Settings"):README.index("## Sessions and files")]
    for name in setting_names():
        assert re.search(rf"\b{name}\b", table), f"setting {name} is missing from the README's table"


@pytest.mark.parametrize("plan", sorted((ROOT / "examples").glob("*.plan")), ids=lambda p: p.name)
def test_example_plans_use_known_commands_and_settings(app, plan):
    commands = set(app.get_visible_commands())
    for line in plan.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split()[0]
        assert word in commands, f"{plan.name}: unknown command {word!r}"
        if word == "set":
            assert line.split()[1] in setting_names(), f"{plan.name}: unknown setting in {line!r}"


def test_every_test_the_readme_names_exists():
    """The guarantees section names the tests that hold each guarantee: a renamed test must not leave it stale."""
    named = re.findall(r"`(tests/\w+\.py)::(\w+)`", README)
    assert len(named) >= 20
    for file, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{file}::{test} is not defined"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared_in_pyproject():
    """A package pgshell imports but pyproject does not name installs only by luck (huggingface_hub came via timm)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    declared = {_canonical(re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0]) for s in specs}
    imported = set()
    for path in (ROOT / "pgshell").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"pgshell", "__future__"})
    assert {"torch", "timm", "huggingface_hub", "cmd2"} <= set(third_party)
    dists = packages_distributions()
    for module in third_party:
        assert module in dists, f"{module} is imported but not installed"
        assert {_canonical(d) for d in dists[module]} & declared, f"{module} is imported but pyproject omits it"
