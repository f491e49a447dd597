"""Session commands: show, save (quit is the app's own)."""

from __future__ import annotations

import cmd2
from cmd2 import with_argparser

from ._common import Commands, parser


# ====================================================================== Session
class SessionCommands(Commands):
    DEFAULT_CATEGORY = "Session"

    @with_argparser(parser("Everything about this session as tables: model, data, settings, position, metrics, "
                           "checkpoint and session file.", "show", wide=True))
    def do_show(self, args):
        """Show the session's state."""
        info = self.session.describe()
        for title, rows in info.items():
            if rows:
                self._cmd.poutput(f"\n{title}")
                self._cmd.ptable(list(rows.items()), None, wide=args.wide, tablefmt="plain", wrap=[1])
        self._cmd.last_result = info

    save_parser = parser("Write the session file and a checkpoint of exactly now (mid-epoch too: it pauses, saves and "
                         "continues). Reopen later with `pgshell -s FILE`.", "save sessions/cats.session")
    save_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete, help="NAME.session (default: current)")

    @with_argparser(save_parser)
    def do_save(self, args):
        """Save the session."""
        path = self.session.save(args.path)
        self._cmd.flush_messages()
        self._cmd.poutput(f"saved {path}")
        self._cmd.last_result = str(path)
