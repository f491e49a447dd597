"""What every command module shares: the argument parser that counts errors, small formatting helpers."""

from __future__ import annotations

import threading

from cmd2 import Cmd2ArgumentParser

_failed = threading.Event()  # set by any error output; a script stops at the first


class Parser(Cmd2ArgumentParser):
    """Argument errors count as a failed command (a plan stops there)."""

    def error(self, message):
        _failed.set()
        super().error(message)


def parser(description: str, example: str) -> Parser:
    return Parser(description=description, epilog=f"example:  {example}")


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
