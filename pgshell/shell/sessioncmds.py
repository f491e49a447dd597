"""Session commands: show, save, fork, expect; `history` (PgShell.do_history calls show_history here)."""

from __future__ import annotations

import cmd2
from cmd2 import as_subcommand_to, with_argparser

from ._common import Commands, parser, sub


# ====================================================================== Session
class SessionCommands(Commands):
    DEFAULT_CATEGORY = "Session"

    show_parser = parser("Everything about this session as tables: model, data, the settings not at their defaults "
                         "(--all: every setting), position, metrics, checkpoint and session file.", "show", wide=True)
    show_parser.add_argument("--all", action="store_true", help="every setting, those at their defaults too")

    @with_argparser(show_parser)
    def do_show(self, args):
        """Show the session's state."""
        from ..session import review as A
        from ..session.describe import defaults_note

        info = self.session.describe(every=args.all)
        probes = A.probe_results(self.session)
        if probes:  # `probe knn` / `probe linear`: the baseline a fine-tune must beat
            info["probe"] = {k: f"val accuracy {r['accuracy']:.4f} at step {r['step']} ({r['time']})"
                             for k, r in probes.items()}
        for title, rows in info.items():
            note = defaults_note(rows) if title == "settings" and not args.all else ""
            if rows or note:
                self._cmd.poutput(f"\n{title}")
            if rows:
                self._cmd.ptable(list(rows.items()), None, wide=args.wide, tablefmt="plain", wrap=[1])
            if note:
                self._cmd.poutput(note)
        self._cmd.last_result = info

    save_parser = parser("Write the session file and a checkpoint of exactly now (mid-epoch too: it pauses, saves and "
                         "continues). Reopen later with `pgshell -s FILE`. A new NAME renames an auto-named session's "
                         "folder, and copies a named one's (the old one stays as it was saved). Onto another "
                         "session's name it asks first (a plan stops), unless --force: that session is replaced "
                         "whole.", "save sessions/cats.session")
    save_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete,
                             help="NAME (sessions/NAME.session) or PATH.session (default: the current file)")
    save_parser.add_argument("--force", action="store_true", help="replace another session of that name")

    @with_argparser(save_parser)
    def do_save(self, args):
        """Save the session."""
        from ..session.files import SessionExists

        try:
            path = self.session.save(args.path, force=args.force)
        except SessionExists as e:
            if not self._cmd.interactive:
                raise
            answer = self._cmd.read_input(f"{e} — replace it? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                self._cmd.poutput("not saved")
                self._cmd.last_result = None
                return
            path = self.session.save(args.path, force=True)
        self._cmd.flush_messages()
        self._cmd.poutput(f"saved {path}")
        self._cmd.last_result = str(path)

    fork_parser = parser("A new session NAME from a checkpoint of this one (default: exactly now), with its change "
                         "log, checkpoints and metrics rows up to that point, in its own folder; the shell then works "
                         "on NAME and this session is saved. `plot A.session B.session` shows where they part. From "
                         "now or the newest checkpoint, continuing with the same settings is the parent bit for bit; "
                         "older checkpoints keep the weights, position and schedule but not the optimizer state (to "
                         "halve the disk), so its momentum restarts there, and the fork says so.",
                         "fork lower-lr --checkpoint 5")
    fork_parser.add_argument("name", help="the new session's name (sessions/NAME.session)")
    fork_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH",
                             help="where to fork: an epoch, step:N (a pause or save at step N), best, last, soup, "
                                  "or a file")

    @with_argparser(fork_parser)
    def do_fork(self, args):
        """Fork the session from a checkpoint."""
        app, parent = self._cmd, self.session
        forked = parent.fork(args.name, args.checkpoint)
        app.switch_session(forked)
        app.flush_messages()
        app.poutput(f"forked {parent.file} into {forked.file}: {forked.summary_line()} — the shell works on "
                    f"{args.name} now ({parent.file.name} is saved)")
        app.last_result = str(forked.file)

    expect_parser = parser("Stop a plan where its replay could not be exact: `expect data MANIFEST` (the attached "
                           "folder holds the same files, byte for byte), `expect file PATH SHA256`, `expect weights "
                           "DIGEST` (the model's weights now). `export plan` writes these lines.",
                           "expect data run.plan.data-1.tsv")
    expect_parser.add_subparsers(required=True, metavar="data|file|weights")
    expect_data_parser = sub("Stop unless the attached folder holds the files of MANIFEST, byte for byte.")
    expect_data_parser.add_argument("manifest", completer=cmd2.Cmd.path_complete)
    expect_file_parser = sub("Stop unless the file at PATH has that SHA-256.")
    expect_file_parser.add_argument("path", completer=cmd2.Cmd.path_complete)
    expect_file_parser.add_argument("sha256")
    expect_weights_parser = sub("Stop unless the model's weights now have that digest.")
    expect_weights_parser.add_argument("digest")

    @with_argparser(expect_parser)
    def do_expect(self, args):
        """Check what a replay starts from."""
        # a failure is one error line; in a plan the app prefixes the plan's line, and the replay stops there
        args.cmd2_subcommand_func(args)

    @as_subcommand_to("expect", "data", expect_data_parser, help="the attached data against a manifest")
    def expect_data(self, args):
        from ..session import replay as R

        self._checked(R.expect_data(self.session, args.manifest))

    @as_subcommand_to("expect", "file", expect_file_parser, help="a file against its SHA-256")
    def expect_file(self, args):
        from ..session import replay as R

        self._checked(R.expect_file(args.path, args.sha256))

    @as_subcommand_to("expect", "weights", expect_weights_parser, help="the model's weights against a digest")
    def expect_weights(self, args):
        from ..session import replay as R

        self._checked(R.expect_weights(self.session, args.digest))

    def _checked(self, msg: str) -> None:
        self._cmd.poutput(f"checked: {msg}")
        self._cmd.last_result = True


history_parser = parser("The session's change log: every command that changed what training does (load, data, "
                        "freeze, unfreeze, set — also by `tune apply` and `lrfind apply` — and train targets), with "
                        "the step at which it took effect. `plot` marks them; `export plan` replays them.", "history",
                        wide=True)


def show_history(app, args) -> None:
    """`history` (cmd2's own, of typed lines, is replaced: PgShell.do_history calls this)."""
    from ..session import replay as R

    rows = R.history(app.session)
    if not rows:
        app.poutput("no changes yet: `data PATH` and `load MODEL` start the log")
    else:  # fitted to the terminal: long changes and notes wrap between words, not mid-token at the edge
        app.ptable([[e.get("n", ""), "" if e.get("pending") else e["step"], e["where"], e["cmd"], R.note(e)]
                    for e in rows], ["#", "step", "where", "change", "note"], wide=args.wide,
                    wrap=["where", "change", "note"])
    app.last_result = rows
