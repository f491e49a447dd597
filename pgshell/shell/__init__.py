"""The shell layer: cmd2 only. `app.PgShell` is the application, `cli` the program; one module per command
category."""

from .app import PgShell
from .cli import main, run_plan

__all__ = ["PgShell", "main", "run_plan"]
