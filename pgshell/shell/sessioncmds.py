"""Session commands: show, save."""

from __future__ import annotations

import cmd2
from cmd2 import CommandSet, with_argparser

from ._common import parser


# ====================================================================== Session
class SessionCommands(CommandSet):
    DEFAULT_CATEGORY = "Session"

    @with_argparser(parser("Everything about this session as tables: model, data, settings, position, metrics, "
                           "checkpoint and session file.", "show"))
    def do_show(self, _):
        """Show the session's state."""
        from tabulate import tabulate

        info = self._cmd.session.describe()
        for title, rows in info.items():
            if rows:
                self._cmd.poutput(f"\n{title}")
                self._cmd.poutput(tabulate(list(rows.items()), tablefmt="plain"))
        self._cmd.last_result = info

    save_parser = parser("Write the session file and a checkpoint of exactly now (mid-epoch too: it pauses, saves and "
                         "continues). Reopen later with `pgshell -s FILE`. A new NAME renames an auto-named session's "
                         "folder, and copies a named one's (the old one stays as it was saved). Onto another "
                         "session's name it asks first (a plan stops), unless --force: that session is replaced "
                         "whole.", "save sessions/cats.session")
    save_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete, help="NAME.session (default: current)")
    save_parser.add_argument("--force", action="store_true", help="replace another session of that name")

    @with_argparser(save_parser)
    def do_save(self, args):
        """Save the session."""
        from ..session.files import SessionExists

        try:
            path = self._cmd.session.save(args.path, force=args.force)
        except SessionExists as e:
            if not self._cmd.interactive:
                raise
            answer = self._cmd.read_input(f"{e} — replace it? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                self._cmd.poutput("not saved")
                self._cmd.last_result = None
                return
            path = self._cmd.session.save(args.path, force=True)
        self._cmd.flush_messages()
        self._cmd.poutput(f"saved {path}")
        self._cmd.last_result = str(path)
