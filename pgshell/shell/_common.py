"""What every command module shares: the argument parser whose errors are one line, the command-set base that is
given the session, small formatting helpers."""

from __future__ import annotations

import functools

from cmd2 import Cmd2ArgumentParser, CommandSet, with_argparser
from cmd2.string_utils import strip_style

from ..engine.errors import PgError


class UsageError(PgError):
    """Arguments argparse refused: its message and the command's usage, as one line."""


class Parser(Cmd2ArgumentParser):
    """Argument errors are raised, not printed: the app prints them as one `error:` line through `perror`, which
    marks the command failed (a plan stops there) and, in a plan, says which line it was."""

    def error(self, message):
        usage = " ".join(strip_style(self.format_usage()).split())
        usage = f"{usage[:1].lower()}{usage[1:]}; " if len(usage) <= 80 else ""  # a long one is `help`'s to show
        raise UsageError(f"{message} ({usage}`help {self.prog}` explains)")


def parser(description: str, example: str, wide: bool = False) -> Parser:
    """A command's parser: its description and example are its `help`. `wide` adds --wide for commands that print
    tables (they fit the terminal by default)."""
    p = Parser(description=description, epilog=f"example:  {example}")
    if wide:
        add_wide(p)
    return p


def sub(description: str) -> Parser:
    """A subcommand's parser (`tune show`, `sessions rm`): its description is `help COMMAND SUB`."""
    return Parser(description=description)


def with_subcommands(p: Parser, verbs: str, title: str):
    """`@with_argparser(p)` for a command with sub-verbs, each a cmd2 subcommand (an `@as_subcommand_to` method);
    the decorated body is what the command does without one (`tune` runs trials, `tune show` lists them)."""
    p.add_subparsers(title=title, metavar=verbs)

    def decorate(body):
        @functools.wraps(body)
        def command(self, args):
            if args.cmd2_subcommand_func is not None:
                return args.cmd2_subcommand_func(args)
            return body(self, args)

        return with_argparser(p)(command)

    return decorate


def add_out(p: Cmd2ArgumentParser, metavar: str, help: str, **kw) -> None:
    """--out FILE: where a command writes (Tab completes paths)."""
    from cmd2 import Cmd

    p.add_argument("--out", metavar=metavar, completer=Cmd.path_complete, help=help, **kw)


def add_wide(p: Cmd2ArgumentParser) -> None:
    p.add_argument("--wide", action="store_true",
                   help="every column, however wide (by default tables fit the terminal)")


def add_sessions(p: Cmd2ArgumentParser, default: str, out: str) -> None:
    """SESSION ... (several sessions side by side) and --out FILE of a command that reads other sessions."""
    from cmd2 import Cmd

    p.add_argument("sessions", nargs="*", metavar="SESSION", completer=Cmd.path_complete,
                   help=f"NAME, NAME.session or a session folder (default: {default})")
    add_out(p, f"FILE.{out.lower()}", f"write a {out}")


class Commands(CommandSet):
    """A command category. It is given the session it works on (cmd2's commandset_custominit pattern); printing,
    results and waiting go through the app, `self._cmd`."""

    def __init__(self, session):
        super().__init__()
        self.session = session


def fmt_secs(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
