"""The pgshell command line: cmd2 only. Commands parse their arguments, call the Session, print. No tensors here.

Interactive (a terminal): `train` returns to the prompt at once; progress shows in the bottom toolbar and epoch
summaries arrive as alerts above the prompt. Scripted (`pgshell < plan.txt` or `pgshell plan.txt`): no prompt, `train`
blocks, progress is one plain line per epoch, and the first failing command ends the process with exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import cmd2
from cmd2 import Settable, with_argparser

from ..engine.config import SETTINGS
from ..engine.errors import PgError
from ..session import Session
from ..session.files import log_error, log_warning
from ._common import Parser, _fmt_secs, _failed, parser
from .analysis import AnalysisCommands
from .data import DataCommands
from .model import ModelCommands
from .sessioncmds import SessionCommands
from .training import TrainingCommands
from .tuning import TuningCommands

# cmd2's own commands (set, help) parse with this class too, so `set lr 0.1 0.2` fails like any bad command and
# a plan stops there; with cmd2's parser it printed a usage error and the plan went on.
cmd2.set_default_argument_parser(Parser)

MAX_LINE = 64 * 1024  # characters in one command line: cmd2's tokenizer is quadratic, a 5 MB line would hang it


class Hangup(SystemExit):
    """SIGTERM or SIGHUP (the terminal closed): raised in the main thread, wherever it waits, and caught by `main`,
    which pauses the run at the batch boundary, writes the checkpoint and the session file, and exits 128 + signal.
    A SystemExit: no `except Exception` swallows it, and asyncio (prompt_toolkit's loop at the prompt) lets it
    through; cmd2 turns one raised inside a command into the end of its loop, so `run_plan` and `main` look at
    `PgShell.hangup` afterwards and raise it again."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


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
                                       AnalysisCommands(), TuningCommands()],
                         enable_bottom_toolbar=self.interactive, refresh_interval=0.5 if self.interactive else 0.0,
                         persistent_history_file=os.path.expanduser("~/.pgshell_history") if self.interactive else "",
                         suggest_similar_command=True, terminators=[],
                         allow_redirection=False)  # `| cmd` would run programs from a plan
        self.prompt = "pgshell> " if self.interactive else ""
        self.intro = ("pgshell — fine-tune image classifiers. `help` lists commands, `help load` explains one."
                      if self.interactive else "")
        self._messages: queue.Queue[str] = queue.Queue()
        self.hangup = 0  # the SIGTERM/SIGHUP received, if any
        self.session = session or Session(root=sessions_dir, notify=self._notify)
        self.session.notify = self._notify
        for name in ("allow_style", "always_show_hint", "editor", "max_completion_table_items", "max_column_completion_results",
                     "scripts_add_to_history", "timing", "feedback_to_output"):
            if name in self.settables:
                self.remove_settable(name)
        self.hidden_commands += ["alias", "macro", "edit", "run_pyscript", "run_script", "shell", "shortcuts",
                                 "history", "_relative_run_script"]
        # a shared plan file must not run programs or Python; `history -o FILE` would truncate any file; a nested
        # script (`run_script`, `@file`) would go on past a failing command: plans are `pgshell plan.txt`
        for name in ("shell", "run_pyscript", "edit", "history", "run_script", "_relative_run_script"):
            self.disable_command(name, f"`{name}` is not available in pgshell"
                                 + (": run a plan with `pgshell PLAN`" if "script" in name else ""))
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

    def flush_messages(self, skip: str = "") -> None:
        while True:
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                return
            if msg != skip:
                self.poutput(msg)

    def wait_for_run(self) -> None:
        """Block until the run ends or pauses, printing its messages as they come (Ctrl-C pauses)."""
        s = self.session
        while not s.wait(timeout=0.2):
            self.flush_messages()
        err = s.status.get("error")
        self.flush_messages(skip=f"error: {err}" if err else "")  # the error line is printed once: raised below
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
        log = log_error(Path(self.session.folder or self.session.root), exception) or "(could not write the log)"
        self.perror(f"internal error: {type(exception).__name__}: {str(exception)[:200]} (full trace in {log})")

    def onecmd_plus_hooks(self, line, *args, **kwargs):
        if isinstance(line, str) and len(line) > MAX_LINE:  # before cmd2 parses it; never echoed back
            self.perror(f"error: a command line of {len(line):,} characters: lines are limited to {MAX_LINE:,}")
            return False
        return super().onecmd_plus_hooks(line, *args, **kwargs)

    def termination_signal_handler(self, signum, _frame):
        """SIGTERM and SIGHUP (cmd2 installs this in its loop; `main` for plans): `main` saves, then exits."""
        _ignore_termination()  # one save: a second signal while saving must not cut it short
        self.hangup = signum
        raise Hangup(signum)

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
    """Run a plan line by line; the first failing command ends it with exit code 1 (the session is still saved,
    unless it failed before training started: then an auto-named session is not left behind)."""
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
        if app.hangup:  # cmd2 took it for an exit request: `main` pauses and saves
            raise Hangup(app.hangup)
        if _failed.is_set():
            if app.session.has_work():
                app.do_quit("")
            else:
                app.session.discard()
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
    _printable_output()
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
    with _saving_on_termination(app), _warnings_to_log(app):
        try:
            return _run(app, args, interactive, notify_box)
        except Hangup as e:
            return _terminated(app, e.signum)


def _run(app: PgShell, args, interactive: bool, notify_box: list) -> int:
    for m in notify_box:
        app.poutput(m)
    if args.session:
        app.poutput(f"reopened {args.session}: {app.session.summary_line()}")
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
    if app.hangup:
        raise Hangup(app.hangup)
    if app.session.worker.thread.is_alive():  # left by an exception path: still save
        app.session.close(save=True)
    return code


# ---------------- signals, warnings, output: what the process as a whole does
def _printable_output() -> None:
    """A file name that is not UTF-8 in any message prints as \\xNN instead of ending the shell."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def _ignore_termination() -> None:
    for sig in _TERMINATION:
        signal.signal(sig, signal.SIG_IGN)


_TERMINATION = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _saving_on_termination(app: PgShell):
    """SIGTERM/SIGHUP raise Hangup in the main thread (cmd2's interactive loop installs the same handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in _TERMINATION}
    for sig in _TERMINATION:
        signal.signal(sig, app.termination_signal_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _terminated(app: PgShell, signum: int) -> int:
    """After SIGTERM/SIGHUP: pause at the batch boundary, write the checkpoint and the session file, exit."""
    name = signal.Signals(signum).name
    try:
        saved = app.session.close(save=True)
        msg = f"{name}: paused and saved {saved}" if saved else f"{name}: nothing unsaved"
    except PgError as e:
        msg = f"{name}: error: {e}"
    with contextlib.suppress(OSError, ValueError):  # the terminal may be gone (SIGHUP)
        app.flush_messages()
        print(msg, file=sys.stderr)
    return 128 + signum


@contextlib.contextmanager
def _warnings_to_log(app: PgShell):
    """Library warnings (torch's UserWarnings, ...) go to the session's errors.log, never into the output."""
    old = warnings.showwarning

    def to_log(message, category, filename, lineno, file=None, line=None):
        log_warning(app.session.folder, warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = to_log
    try:
        yield
    finally:
        warnings.showwarning = old


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
