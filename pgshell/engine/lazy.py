"""Packages that hand out their modules' names lazily (PEP 562): importing a package imports none of its modules, so
`from pgshell.engine import models as M` costs nothing until a name is used (the shell starts without torch)."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, *tables: dict[str, str]):
    """The package's module-level `__getattr__`: NAME -> getattr(the package's module that `tables` say holds it)."""

    def __getattr__(name: str):
        for table in tables:
            if name in table:
                return getattr(import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def exports(table: str) -> dict[str, str]:
    """NAME -> module from lines "module: NAME NAME ..." (a package's table of what it hands out)."""
    out = {}
    for line in table.strip().splitlines():
        module, names = line.split(":", 1)
        out.update(dict.fromkeys(names.split(), module.strip()))
    return out
