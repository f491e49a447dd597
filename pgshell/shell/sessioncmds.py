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

        from .. import analysis as A

        info = self._cmd.session.describe()
        probes = A.probe_results(self._cmd.session)
        if probes:  # `probe knn` / `probe linear`: the baseline a fine-tune must beat
            info["probe"] = {k: f"val accuracy {r['accuracy']:.4f} at step {r['step']} ({r['time']})"
                             for k, r in probes.items()}
        for title, rows in info.items():
            if rows:
                self._cmd.poutput(f"\n{title}")
                self._cmd.poutput(tabulate(list(rows.items()), tablefmt="plain"))
        self._cmd.last_result = info

    save_parser = parser("Write the session file and a checkpoint of exactly now (mid-epoch too: it pauses, saves and "
                         "continues). Reopen later with `pgshell -s FILE`.", "save sessions/cats.session")
    save_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete, help="NAME.session (default: current)")

    @with_argparser(save_parser)
    def do_save(self, args):
        """Save the session."""
        path = self._cmd.session.save(args.path)
        self._cmd.flush_messages()
        self._cmd.poutput(f"saved {path}")
        self._cmd.last_result = str(path)
