"""The shell layer: cmd2 only. `app.PgShell` is the application; one module per command category."""

from .app import PgShell, main, run_plan

__all__ = ["PgShell", "main", "run_plan"]
