"""The `pgshell` program: the interactive shell, or a plan run line by line (`pgshell plan.txt`, `pgshell < plan.txt`),
or one process of a DDP plan under torchrun."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

from ..engine.errors import PgError
from ..session import Session
from ..session.files import log_warning
from .app import TERMINATION, Hangup, PgShell, ignore_termination


def run_plan(app: PgShell, lines, name: str = "") -> int:
    """Run a plan line by line. The first failing command ends it with exit code 1; its error names the line
    (`plan.txt:3: set lr fast: ...`, or `line 3: ...` on stdin) and the session is saved as it was before that line
    (or as the line left it, when it got a run going). `app.echo` prints each command before its output. Ctrl-C
    (SIGINT) pauses the run, and the plan stops after that line, saved, with exit code 130: the lines after it
    (an `export`) must not act on a half-trained model."""
    with _interrupt_stops_plan(app):
        return _run_lines(app, lines, name)


def _run_lines(app: PgShell, lines, name: str) -> int:
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if app.echo:
            app.poutput(f"pgshell> {line}")
        before = _progress(app.session)
        app.failed.clear()
        shown = line if len(line) <= 120 else line[:60] + "…"  # an error never echoes a huge line back
        app.plan_line = f"{name}:{number}: {shown}" if name else f"line {number}: {shown}"
        try:
            stop = app.onecmd_plus_hooks(line)
        except KeyboardInterrupt:
            app.session.request_pause()
            app.interrupted = signal.SIGINT
            stop = False
        app.plan_line = None
        if app.hangup:  # cmd2 took it for an exit request: `main` pauses and saves
            raise Hangup(app.hangup)
        if getattr(app, "interrupted", 0):
            app.close_session(f"the session as line {number} left it")  # pauses at the batch boundary first
            app.perror(f"{f'{name}:{number}' if name else f'line {number}'}: interrupted (SIGINT): the plan stops "
                       "here, saved; the lines after it did not run")
            return 128 + signal.SIGINT
        if app.failed.is_set():
            if not app.session.has_work():  # failed before training started: no auto-named session left behind
                app.session.discard()
                if app.session.built is not None:  # there was something a save would have kept: say why not
                    app.poutput(f"nothing saved: line {number} failed before any training, so no session is left "
                                "behind")
                return 1
            unchanged = _progress(app.session) == before
            app.close_session(f"the session as it was before line {number}" if unchanged
                              else f"the session as line {number} left it")
            return 1
        if stop:
            return app.exit_code or 0
    app.close_session()
    return 1 if app.failed.is_set() else 0  # the final save failed


@contextlib.contextmanager
def _interrupt_stops_plan(app: PgShell):
    """In a plan, SIGINT pauses the run at the batch boundary and marks the plan to stop after its line (the
    default handler would raise inside cmd2, which drops it and goes on to the next line)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, _frame):
        app.interrupted = signum
        app.session.request_pause()

    app.interrupted = 0
    old = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _progress(session: Session) -> tuple:
    """What a failing line may have changed that a save keeps: the training position, and whether a run waits."""
    pos = getattr(session.trainer, "pos", None)
    return getattr(pos, "step", None), session.paused


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgshell", description="AI Playground: fine-tune pretrained image classifiers.")
    ap.add_argument("plan", nargs="?", help="a plan file to run (default: read commands from stdin / the terminal)")
    ap.add_argument("-s", "--session", help="reopen a saved session: sessions/NAME.session")
    ap.add_argument("--sessions-dir", default=os.environ.get("PGSHELL_SESSIONS", "sessions"),
                    help="where new sessions are saved (default: ./sessions)")
    ap.add_argument("--echo", action="store_true", help="plans: print each command before its output")
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
    with _terminating_start():  # SIGTERM while reopening: one line, the session left as it was saved
        try:
            if args.session:
                try:
                    session = Session.open(args.session, notify=lambda m: notify_box.append(m))
                except PgError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
            app = PgShell(session=session, interactive=interactive, sessions_dir=args.sessions_dir)
        except Hangup as e:  # still ignoring further signals here: the line below is printed whatever comes
            if session is not None:
                session.close(save=False)
            what = f"reopening {args.session}" if args.session else "starting"
            print(f"{signal.Signals(e.signum).name} while {what}: stopped before anything ran; the session is as "
                  "it was saved", file=sys.stderr)
            return 128 + e.signum
    app.echo = args.echo
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
        return run_plan(app, lines, args.plan)
    if not interactive:
        return run_plan(app, sys.stdin)
    code = app.cmdloop()
    if app.hangup:
        raise Hangup(app.hangup)
    if app.session.worker.thread.is_alive():  # left by an exception path: still save
        app.session.close(save=True)
    return code


def _main_ddp(args) -> int:
    """One process of `torchrun ... -m pgshell --ddp plan.txt`: every rank runs the plan; rank 0 alone prints and
    writes files."""
    from ..engine.train import distributed

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
        app.echo = args.echo
        with open(args.plan) as f:
            return run_plan(app, f.readlines(), args.plan)
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


# ---------------- signals, warnings, output: what the process as a whole does
def _printable_output() -> None:
    """A file name that is not UTF-8 in any message prints as \\xNN instead of ending the shell."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


@contextlib.contextmanager
def _saving_on_termination(app: PgShell):
    """SIGTERM/SIGHUP raise Hangup in the main thread (cmd2's interactive loop installs the same handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in TERMINATION}
    for sig in TERMINATION:
        signal.signal(sig, app.termination_signal_handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _terminating_start():
    """SIGTERM/SIGHUP before the shell exists (reopening a session) raise Hangup in the main thread, as later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hangup(signum, _frame):
        ignore_termination()  # one line: a second signal must not cut it short
        raise Hangup(signum)

    old = {sig: signal.signal(sig, hangup) for sig in TERMINATION}
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
