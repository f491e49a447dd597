"""The pgshell command line: cmd2 only. Commands parse their arguments, call the Session, print. No tensors here.

Interactive (a terminal): `train` returns to the prompt at once; progress shows in the bottom toolbar and epoch
summaries arrive as alerts above the prompt. Scripted (`pgshell < plan.txt` or `pgshell plan.txt`): no prompt, `train`
blocks, progress is one plain line per epoch, and the first failing command ends the process with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import traceback
from pathlib import Path
from typing import Any

import cmd2
from cmd2 import Settable, with_argparser

from ..engine.config import SETTINGS
from ..engine.errors import PgError
from ..session import Session
from ._common import Parser, _fmt_secs, _failed, parser
from .analysis import AnalysisCommands
from .data import DataCommands
from .model import ModelCommands
from .review import ReviewCommands
from .sessioncmds import SessionCommands
from .training import TrainingCommands
from .tuning import TuningCommands

# cmd2's own commands (set, help) parse with this class too, so `set lr 0.1 0.2` fails like any bad command and
# a plan stops there; with cmd2's parser it printed a usage error and the plan went on.
cmd2.set_default_argument_parser(Parser)


# ====================================================================== the app
class _Settings:
    """The object cmd2's `set` writes to: every write goes through Session.set (validation, live application)."""

    def __init__(self, app: "PgShell"):
        object.__setattr__(self, "_app", app)

    def __getattr__(self, name):
        return getattr(self._app.session.config, name)

    def __setattr__(self, name, value):
        note = self._app.session.set(name, value)
        if note:
            self._app.poutput(note)


def _validator(name: str):
    from ..engine.config import parse_value

    def validate(value):
        try:
            return parse_value(name, value)
        except PgError as e:
            raise ValueError(str(e)) from None

    validate.__name__ = name
    return validate


class PgShell(cmd2.Cmd):
    """AI Playground: fine-tune pretrained image classifiers, step by step."""

    def __init__(self, session: Session | None = None, interactive: bool | None = None,
                 stdin=None, stdout=None, sessions_dir: str = "sessions"):
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty() if interactive is None else interactive
        super().__init__(stdin=stdin, stdout=stdout, allow_cli_args=False, auto_load_commands=False,
                         command_sets=[ModelCommands(), DataCommands(), TrainingCommands(), SessionCommands(),
                                       AnalysisCommands(), TuningCommands(), ReviewCommands()],
                         enable_bottom_toolbar=self.interactive, refresh_interval=0.5 if self.interactive else 0.0,
                         persistent_history_file=os.path.expanduser("~/.pgshell_history") if self.interactive else "",
                         suggest_similar_command=True, terminators=[],
                         allow_redirection=False)  # `| cmd` would run programs from a plan
        self.prompt = "pgshell> " if self.interactive else ""
        self.intro = ("pgshell — fine-tune image classifiers. `help` lists commands, `help load` explains one."
                      if self.interactive else "")
        self._messages: queue.Queue[str] = queue.Queue()
        self.session = session or Session(root=sessions_dir, notify=self._notify)
        self.session.notify = self._notify
        for name in ("allow_style", "always_show_hint", "editor", "max_completion_table_items", "max_column_completion_results",
                     "scripts_add_to_history", "timing", "feedback_to_output"):
            if name in self.settables:
                self.remove_settable(name)
        self.hidden_commands += ["alias", "macro", "edit", "run_pyscript", "run_script", "shell", "shortcuts",
                                 "history", "_relative_run_script"]
        for name in ("shell", "run_pyscript", "edit"):  # a shared plan file must not run programs or Python
            self.disable_command(name, f"`{name}` is not available in pgshell")
        self._settings = _Settings(self)
        for name, f in SETTINGS.items():
            meta = f.metadata
            kw: dict[str, Any] = {}
            if meta["choices"]:
                kw["choices"] = list(meta["choices"])
            elif isinstance(f.default, bool):
                kw["choices_provider"] = _bool_choices
            self.add_settable(Settable(name, _validator(name), meta["help"], self._settings, **kw))

    # ---------------- messages from the worker thread
    def _notify(self, msg: str) -> None:
        if self.interactive:
            self.add_alert(msg=msg)
        else:
            self._messages.put(msg)

    def flush_messages(self) -> None:
        while True:
            try:
                self.poutput(self._messages.get_nowait())
            except queue.Empty:
                return

    def wait_for_run(self) -> None:
        """Block until the run ends or pauses, printing its messages as they come (Ctrl-C pauses)."""
        s = self.session
        while not s.wait(timeout=0.2):
            self.flush_messages()
        self.flush_messages()
        err = s.status.get("error")
        if err:
            s.status.pop("error", None)
            raise PgError(err)
        self.last_result = dict(s.status)

    def after_start(self) -> None:
        if not self.interactive:
            self.wait_for_run()
        else:
            self.last_result = True

    # ---------------- toolbar
    def get_bottom_toolbar(self):
        st = self.session.status
        state = st.get("state", "idle")
        if state == "training" and "batch" in st:
            if st.get("job") == "lrfind":
                return (f" lrfind  batch {st['batch']}/{st['batches']}  lr {st['lr']:.2g}  loss {st['loss']:.4f}  "
                        f"ETA {_fmt_secs(st['eta'])}")
            trial = f" trial {st['trial']} ({st['trials_done']}/{st['trials']} done) " if "trial" in st else ""
            return (f"{trial} epoch {st['epoch']}  batch {st['batch']}/{st['batches']}  loss {st['loss']:.4f}  "
                    f"acc {st['accuracy']:.3f}  lr {st['lr']:.2g}  {st['rate']:.0f} img/s  ETA {_fmt_secs(st['eta'])}")
        if state == "training":
            return " training: starting…"
        if state == "paused":
            return " paused — `continue` resumes, `save` keeps it" + (f"  ({st['error']})" if st.get("error") else "")
        return " idle — `help` lists commands"  # always one line, so the toolbar's row is there before training

    # ---------------- errors: one clear line, never a traceback for user errors
    def perror(self, *objects, **kwargs):
        _failed.set()
        super().perror(*objects, **kwargs)

    def pexcept(self, exception, **kwargs):
        if isinstance(exception, PgError):
            self.perror(f"error: {exception}")
            return
        if isinstance(exception, (ValueError,)) and "Error setting" in str(exception):
            self.perror(str(exception))
            return
        log = Path(self.session.folder or self.session.root) / "errors.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write("".join(traceback.format_exception(exception)))
        except OSError:
            log = Path("(could not write the log)")
        self.perror(f"internal error: {type(exception).__name__}: {str(exception)[:200]} (full trace in {log})")

    def sigint_handler(self, signum, frame):
        if self.session.running:  # Ctrl-C while a command waits on training: pause it, keep the shell
            self.session.request_pause()
            self.poutput("^C — pausing after this batch")
            return
        super().sigint_handler(signum, frame)

    def _read_command_line(self, prompt):
        try:
            return super()._read_command_line(prompt)
        except KeyboardInterrupt:
            if self.session.running:  # Ctrl-C at the prompt during training pauses it
                self.session.request_pause()
                self.poutput("pausing after this batch (`continue` resumes)")
            raise

    # ---------------- quit: pause and save first
    @with_argparser(parser("Quit. A run in progress is paused and the session saved first.", "quit"))
    def do_quit(self, _):
        """Quit pgshell (saving first)."""
        try:
            saved = self.session.close(save=True)
        except PgError as e:  # e.g. a full disk: say so in one line, and quit all the same
            self.perror(f"error: {e}")
            saved = None
        self.flush_messages()
        if saved:
            self.poutput(f"saved {saved}")
        self.last_result = True
        return True


def _bool_choices(_self):
    from cmd2.completion import Choices

    return Choices.from_values(["on", "off"])


# ====================================================================== entry point
def run_plan(app: PgShell, lines) -> int:
    """Run a plan line by line; the first failing command ends it with exit code 1 (the session is still saved)."""
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        _failed.clear()
        try:
            stop = app.onecmd_plus_hooks(line)
        except KeyboardInterrupt:
            app.session.request_pause()
            app.perror("interrupted: pausing and saving")
            _failed.set()
            stop = False
        if _failed.is_set():
            app.do_quit("")
            return 1
        if stop:
            return app.exit_code or 0
    app.do_quit("")
    return 1 if _failed.is_set() else 0  # the final save failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgshell", description="AI Playground: fine-tune pretrained image classifiers.")
    ap.add_argument("plan", nargs="?", help="a plan file to run (default: read commands from stdin / the terminal)")
    ap.add_argument("-s", "--session", help="reopen a saved session: sessions/NAME.session")
    ap.add_argument("--sessions-dir", default=os.environ.get("PGSHELL_SESSIONS", "sessions"),
                    help="where new sessions are saved (default: ./sessions)")
    ap.add_argument("--ddp", action="store_true",
                    help="under torchrun: DistributedDataParallel over all processes (needs a PLAN file)")
    ap.add_argument("--version", action="version", version=f"pgshell {__import__('pgshell').__version__}")
    args = ap.parse_args(argv)
    if args.ddp:
        return _main_ddp(args)
    interactive = args.plan is None and sys.stdin.isatty() and sys.stdout.isatty()
    notify_box: list = []
    session = None
    if args.session:
        try:
            session = Session.open(args.session, notify=lambda m: notify_box.append(m))
        except PgError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    app = PgShell(session=session, interactive=interactive, sessions_dir=args.sessions_dir)
    for m in notify_box:
        app.poutput(m)
    if session is not None:
        app.poutput(f"reopened {args.session}: {session.summary_line()}")
    if args.plan:
        try:
            with open(args.plan) as f:
                lines = f.readlines()
        except OSError as e:
            print(f"error: cannot read plan {args.plan}: {e.strerror}", file=sys.stderr)
            app.session.close(save=False)
            return 1
        return run_plan(app, lines)
    if not interactive:
        return run_plan(app, sys.stdin)
    code = app.cmdloop()
    if app.session._worker.is_alive():  # left by an exception path: still save
        app.session.close(save=True)
    return code


def _main_ddp(args) -> int:
    """One process of `torchrun ... -m pgshell --ddp plan.txt`: every rank runs the plan; rank 0 alone prints and
    writes files."""
    from ..engine import distributed

    if not args.plan:
        print("error: --ddp needs a plan file (processes cannot share stdin): pgshell --ddp plan.txt",
              file=sys.stderr)
        return 2
    try:
        w = distributed.init_from_env()
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout if w.main else open(os.devnull, "w")
    try:
        session = Session.open(args.session) if args.session else None
        app = PgShell(session=session, interactive=False, sessions_dir=args.sessions_dir, stdout=out)
        with open(args.plan) as f:
            return run_plan(app, f.readlines())
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
