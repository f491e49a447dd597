"""The pgshell application: cmd2 only. Commands parse their arguments, call the Session, print. No tensors here.

Interactive (a terminal): `train` returns to the prompt at once; progress shows in the bottom toolbar and epoch
summaries arrive as alerts above the prompt. Scripted (`pgshell < plan.txt` or `pgshell plan.txt`, see cli.py): no
prompt, `train` blocks, progress is one plain line per epoch, and the first failing command ends the process.
"""

from __future__ import annotations

from contextlib import contextmanager

import difflib
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cmd2
from cmd2 import Settable, plugin, with_argparser, with_category
from cmd2.utils import suggest_similar

from ..engine.config import SETTINGS
from ..engine.errors import PgError
from ..session import Session
from ..session.describe import best_line
from ..session.files import log_error
from ._common import Parser, fmt_secs, parser
from ._table import fit_table
from .analysis import AnalysisCommands
from .bestcmds import BestCommands
from .auditcmds import AuditCommands
from .datacmds import DataCommands
from .model import ModelCommands
from .reviewcmds import ReviewCommands
from .sessioncmds import SessionCommands, history_parser, show_history
from .training import TrainingCommands
from .tuning import TuningCommands

# cmd2's own commands (set, help, history) parse with this class too, so their argument errors are one line that
# fails the command like any other (a plan stops there).
cmd2.set_default_argument_parser(Parser)

PROGRESS_EVERY = 10.0  # seconds between the progress lines `wait` prints
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


# cmd2's documented way to name the category of its built-in commands (help, set, history): not "Cmd2 Commands".
cmd2.Cmd.DEFAULT_CATEGORY = "Shell"

_CMD2_HIDDEN = ["alias", "macro", "edit", "run_pyscript", "run_script", "shell", "shortcuts", "_relative_run_script"]


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
        self._messages: queue.Queue[str] = queue.Queue()
        self.failed = threading.Event()  # set by any error output; a plan stops at the first. Per app, not global
        self.plan_line: str | None = None  # "plan.txt:3: set lr fast" while a plan runs that line (cli.run_plan)
        self._pause_noted = False  # Ctrl-C while waiting says so once per run, however often it is pressed
        self._hold_alerts = False  # True while a command blocks: alerts would only show at the next prompt
        session = session or Session(root=sessions_dir, notify=self.notify)
        super().__init__(stdin=stdin, stdout=stdout, allow_cli_args=False, auto_load_commands=False,
                         command_sets=[cls(session) for cls in (ModelCommands, DataCommands, TrainingCommands,
                                                                SessionCommands, AnalysisCommands, TuningCommands,
                                                                ReviewCommands, BestCommands, AuditCommands)],
                         enable_bottom_toolbar=self.interactive, refresh_interval=0.5 if self.interactive else 0.0,
                         persistent_history_file=os.path.expanduser("~/.pgshell_history") if self.interactive else "",
                         suggest_similar_command=True, terminators=[],
                         allow_redirection=False)  # `| cmd` would run programs from a plan
        self.prompt = "pgshell> " if self.interactive else ""
        self.intro = ("pgshell — fine-tune image classifiers. `help` lists commands, `help load` explains one."
                      if self.interactive else "")
        self.session = session
        self.session.report_to(self.notify)
        self.hidden_commands += _CMD2_HIDDEN
        self._said_best = ""
        self.hangup = 0  # the SIGTERM/SIGHUP received, if any
        # a shared plan file must not run programs or Python; a nested script (`run_script`, `@file`) would go on
        # past a failing command: plans are `pgshell plan.txt`. (`history` is the session's change log: it writes
        # nothing and runs nothing.)
        for name in ("shell", "run_pyscript", "edit", "run_script", "_relative_run_script"):
            self.disable_command(name, f"`{name}` is not available in pgshell"
                                 + (": run a plan with `pgshell PLAN`" if "script" in name else ""))
        self.register_postparsing_hook(self._unescape_spaces)
        self._add_settings()
        for name, example in (("help", "help train"),):  # cmd2's own: no example
            self.command_parsers.get(getattr(self, f"do_{name}")).epilog = f"example:  {example}"

    def _add_settings(self) -> None:
        """`set` lists the training settings only: cmd2's own (debug, echo, quiet, traceback_*...) are not for
        users here (`pgshell --echo` echoes a plan's commands)."""
        for name in list(self.settables):
            self.remove_settable(name)
        self._settings = _Settings(self)
        for name, f in SETTINGS.items():
            meta = f.metadata
            kw: dict[str, Any] = {}
            if meta["listed"]:  # known only by importing torch: asked for at the first Tab
                kw["choices_provider"] = _listed_choices(meta["listed"])
            elif meta["choices"]:
                kw["choices"] = list(meta["choices"])
            elif isinstance(f.default, bool):
                kw["choices_provider"] = _bool_choices
            self.add_settable(Settable(name, _validator(name), meta["help"], self._settings, **kw))

    @classmethod
    def _build_base_set_parser(cls):
        """cmd2 builds `set`'s parser (and its completion parser) from this: our help lists the training settings
        with their meaning and gives an example instead of cmd2's generic text."""
        p = super()._build_base_set_parser()
        p.description = _settings_help()
        p.epilog = ("example:  set lr 0.01    (`set` alone lists every setting with its value, `set lr` shows one; "
                    "Tab completes names and choices)")
        return p

    # ---------------- messages from the worker thread
    def notify(self, msg: str) -> None:
        """One line from the session (any thread): an alert at the prompt, or printed in order by a script."""
        if msg.startswith("best epoch "):
            self._said_best = msg  # the end of a run said it: quit need not say it again
        if self.interactive and not self._hold_alerts:
            self.add_alert(msg=msg)
        else:  # a script, or a command that blocks (`wait`, `quit`): printed by flush_messages as they come
            self._messages.put(msg)

    def flush_messages(self, skip: str = "") -> None:
        while True:
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                return
            if msg != skip:
                self.poutput(msg)

    @contextmanager
    def holding_alerts(self):
        """While a command blocks (`wait`), a run's lines are printed as they come, not held for the next prompt."""
        self._hold_alerts = True
        try:
            yield
        finally:
            self._hold_alerts = False

    def wait_for_run(self, progress: bool = False) -> None:
        """Block until the run ends or pauses, printing its messages as they come (Ctrl-C pauses); `progress`: the
        toolbar's line too, every PROGRESS_EVERY seconds when it changed (`wait`: the toolbar is not drawn while a
        command runs, so the screen stood still for minutes)."""
        s = self.session
        shown, due = "", time.monotonic() if progress else float("inf")  # where the run is, at once
        while True:
            if time.monotonic() >= due:
                line = toolbar_line(dict(s.status)).strip()
                if line != shown:
                    self.poutput(line)
                    shown = line
                due = time.monotonic() + PROGRESS_EVERY
            if s.wait(timeout=0.2):
                break
            self.flush_messages()
        err = s.status.get("error")
        self.flush_messages(skip=f"error: {err}" if err else "")  # the error line is printed once: raised below
        if err:
            s.status.pop("error", None)
            raise PgError(err)
        self.last_result = dict(s.status)

    def after_start(self) -> None:
        self._pause_noted = False
        if not self.interactive:
            self.wait_for_run()
        else:
            self.last_result = True

    # ---------------- output helpers
    def table_width(self) -> int | None:
        """Columns tables must fit: $COLUMNS, else the terminal's; None (no limit) into a file or a pipe."""
        if os.environ.get("COLUMNS", "").isdigit():
            return int(os.environ["COLUMNS"])
        try:
            return os.get_terminal_size(self.stdout.fileno()).columns if self.stdout.isatty() else None
        except (AttributeError, OSError, ValueError):  # a StringIO, a closed stream
            return None

    def ptable(self, rows, headers, *, wide: bool = False, **fit) -> None:
        """Print a table that fits the terminal (`fit_table`); `wide` prints every column however wide."""
        self.poutput(fit_table(rows, headers, None if wide else self.table_width(), **fit))

    # ---------------- toolbar
    def get_bottom_toolbar(self):
        st = dict(self.session.status)  # the worker replaces or updates it meanwhile: read one snapshot
        try:
            return toolbar_line(st)
        except Exception:  # noqa: BLE001 — prompt_toolkit would print a traceback under the prompt at every refresh
            return f" {st.get('state', 'idle')}"

    # ---------------- errors: one clear line, never a traceback for user errors
    def perror(self, *objects, **kwargs):
        self.failed.set()
        if self.plan_line and objects:  # a plan's first error says which line failed (`plan.txt:3: set lr fast`)
            objects = (f"{self.plan_line}: {objects[0]}", *objects[1:])
            self.plan_line = None
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
        ignore_termination()  # one save: a second signal while saving must not cut it short
        self.hangup = signum
        raise Hangup(signum)

    # ---------------- Ctrl-C
    def sigint_handler(self, signum, frame):
        if self.session.running:  # Ctrl-C while a command waits on training: pause it, keep the shell
            self.session.request_pause()
            if not self._pause_noted:  # the terminal already echoed ^C: say it once, not ^C^C
                self._pause_noted = True
                self.poutput(("" if _terminal_echoes_ctrl_c(self.stdin) else "^C") + " — pausing after this batch")
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

    # ---------------- a mistyped command: say which one was meant, on one line
    def default(self, statement):
        """A word that is no command (`hist`, `trian 3`): the closest commands, as `help trian` says them too."""
        self.perror(f"{statement.command} is not a recognized command{_did_you_mean(statement.command, self)}")

    @with_argparser(cmd2.Cmd._build_help_parser)
    def do_help(self, args):
        """List available commands or provide detailed help for a specific command."""
        name = args.command
        if name and not args.verbose and name not in self.get_all_commands() and name not in self.get_help_topics():
            raise PgError(f"no command {name}{_did_you_mean(name, self, 'help ')}")
        cmd2.Cmd.do_help.__wrapped__(self, args)  # cmd2's own, with the arguments already parsed

    # ---------------- the session's change log (cmd2's `history` of typed lines is replaced by it)
    @with_argparser(history_parser)
    def do_history(self, args):
        """The session's changes, with the step at which each took effect."""
        show_history(self, args)

    # ---------------- `data my\ data`: a backslash-escaped space is part of the word, as in a Unix shell
    def _unescape_spaces(self, data: plugin.PostparsingData) -> plugin.PostparsingData:
        raw = data.statement.raw
        fixed = unescape_spaces(raw)
        if fixed != raw:
            data.statement = self.statement_parser.parse(fixed)
        return data

    def switch_session(self, session: Session) -> None:
        """Work on another session (after `fork`): the app and every command set are given it."""
        self.session = session
        session.report_to(self.notify)
        for commands in self._installed_command_sets:
            commands.session = session

    # ---------------- quit: pause and save first
    @with_category("Session")
    @with_argparser(parser("Quit. A run in progress is paused and the session saved first.", "quit"))
    def do_quit(self, _):
        """Quit pgshell (saving first)."""
        self.close_session()
        self.last_result = True
        return True

    def close_session(self, what: str = "") -> Path | None:
        """Pause and save if anything is unsaved, end the worker, and say what was saved (`what`: which state).
        A plan that trained nothing and named nothing (`eval`, `predict` on a loaded model) leaves nothing."""
        self._hold_alerts = True  # the lines of a run paused now (its epoch's end) are printed here, not lost
        if not self.interactive and not what and self.session.disposable():
            self.session.discard()
            self.flush_messages()
            self.poutput("nothing trained and no name given: no session kept (`save NAME` in the plan keeps one)")
            return None
        try:
            saved = self.session.close(save=True)
        except PgError as e:  # e.g. a full disk: say so in one line, and quit all the same
            self.perror(f"error: {e}")
            saved = None
        self.flush_messages()
        best = best_line(self.session)
        if best and best != self._said_best:  # a script's last lines name the best epoch, not only the last one
            self.poutput(best)
        if saved:
            self.poutput(f"saved {what}: {saved}" if what else f"saved {saved}")
        return saved


# ====================================================================== helpers
def _listed_choices(values):
    def listed(_self):
        from cmd2.completion import Choices

        return Choices.from_values(list(values()))
    return listed


def _bool_choices(_self):
    from cmd2.completion import Choices

    return Choices.from_values(["on", "off"])


def _settings_help():
    """`help set`: what `set` does, then every training setting with its default and meaning."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table("setting", "default", "meaning", box=None, pad_edge=False, show_edge=False)
    for name, f in SETTINGS.items():
        live = " (applies at the next batch)" if f.metadata["live"] else ""
        default = f.default
        table.add_row(name, str(default).lower() if isinstance(default, bool) else
                      f"{default:g}" if isinstance(default, float) else str(default),
                      f.metadata["help"] + live)
    intro = Text("Change a training setting: `set NAME VALUE`. `set` alone lists them all with their values, "
                 "`set NAME` shows one. While training, the settings marked so apply at the next batch; the others "
                 "when training next starts (the shell says so). Booleans take on/off, true/false.\n")
    return Group(intro, table)


def toolbar_line(st: dict) -> str:
    """The bottom toolbar for a status (session/worker.py `Status`) of any job in any phase: each part is shown
    when its fields are there, so a status that lacks one (a range test has no accuracy, a trial between two runs
    has no batch yet) shows what it has."""
    state = st.get("state", "idle")
    if state == "paused":
        return " paused — `continue` resumes, `save` keeps it" + (f"  ({st['error']})" if st.get("error") else "")
    if state != "training":
        return " idle — `help` lists commands"  # always one line, so the toolbar's row is there before training
    job = st.get("job", "train")
    where = []  # which job, trial and epoch
    if job == "tune" and _has(st, "trials"):
        done = f"{st['trials_done']}/{st['trials']} done" if _has(st, "trials_done") else f"{st['trials']} trials"
        where.append(f"trial {st['trial']} ({done})" if _has(st, "trial") else f"tune ({done})")
    elif job not in ("train", "tune"):
        where.append(str(job))
    if _has(st, "epoch") and job != "lrfind":
        where.append(f"epoch {st['epoch']}")
    if st.get("phase"):  # validation, a cache build: no batch to show
        phase = _phase_line(st)
        return " " + "  ".join([*where, phase.removeprefix(" training: ")]) if where else phase
    if not _has(st, "loss", float):  # no batch done yet in this run
        return " " + "  ".join([*where, "starting…"]) if where else " training: starting…"
    parts = list(where)
    if _has(st, "batch"):
        parts.append(f"batch {st['batch']}/{st['batches']}" if _has(st, "batches") else f"batch {st['batch']}")
    for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"), ("lr", "lr {:.2g}"),
                     ("rate", "{:.0f} img/s")):
        if _has(st, key, float):
            parts.append(fmt.format(st[key]))
    if _has(st, "eta", float):
        parts.append(f"ETA {fmt_secs(st['eta'])}")
    return " " + "  ".join(parts)


def _has(st: dict, key: str, kind: type = int) -> bool:
    """Whether the status holds a usable `key`: an int (any finite number for `float`), not None, NaN or inf."""
    v = st.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or (kind is float and math.isfinite(v))


def _phase_line(st: dict) -> str:
    """The toolbar while a run prepares (feature cache, input decode) or validates: the phase, its progress, ETA."""
    done, total = st.get("done"), st.get("total")
    line = f" training: {st['phase']}"
    if _has(st, "done") and _has(st, "total") and total > 0:
        line += f" {done:,}/{total:,} ({100 * done // total}%)"
        if _has(st, "eta", float) and done > 0:  # at 0 done nothing is timed yet: no ETA rather than 0m00s
            line += f"  ETA {fmt_secs(st['eta'])}"
    elif _has(st, "eta", float):
        line += f"  ETA {fmt_secs(st['eta'])}"
    return line


def _did_you_mean(word: str, app: cmd2.Cmd, prefix: str = "") -> str:
    """` — did you mean `history`? (...)` for a mistyped command: cmd2's closest spelling, else the commands the
    word begins (an abbreviation: `hist`, `sess`), else difflib's near matches; then where the list is."""
    commands = app.get_visible_commands()
    word = word.lower()
    close = [c for c in [suggest_similar(word, commands)] if c] or sorted(c for c in commands if c.startswith(word)) \
        or difflib.get_close_matches(word, commands, n=3, cutoff=0.6)
    if not close:
        return " — `help` lists the commands"
    said = " or ".join(f"`{prefix}{c}`" for c in close[:3])
    return f" — did you mean {said}? (`help` lists the commands)"


def _terminal_echoes_ctrl_c(stdin) -> bool:
    """Whether the terminal itself prints ^C when Ctrl-C is pressed (termios ECHOCTL, on by default on Linux)."""
    try:
        import termios

        return bool(termios.tcgetattr(stdin.fileno())[3] & termios.ECHOCTL)
    except Exception:  # noqa: BLE001 — no termios, not a terminal, a closed stream: assume it does not
        return False


def unescape_spaces(line: str) -> str:
    """`data my\\ data --size 32` -> `data "my data" --size 32`: cmd2 splits words without POSIX escapes, so a word
    holding backslash-escaped spaces is quoted instead. Quoted text and other backslashes are left as they are."""
    if "\\ " not in line:
        return line
    words, word, quote, escaped, i = [], "", "", False, 0
    while i < len(line):
        c = line[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "\\" and line[i + 1:i + 2] == " ":
            c, escaped, i = " ", True, i + 1
        elif c == " ":
            words.append(_quoted(word) if escaped else word)
            word, escaped, i = "", False, i + 1
            continue
        word += c
        i += 1
    words.append(_quoted(word) if escaped else word)
    return " ".join(words)


def _quoted(word: str) -> str:
    return f"'{word}'" if '"' in word else f'"{word}"'


TERMINATION = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def ignore_termination() -> None:
    for sig in TERMINATION:
        signal.signal(sig, signal.SIG_IGN)
