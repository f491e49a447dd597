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
import threading
import traceback
from pathlib import Path
from typing import Any

import cmd2
from cmd2 import Cmd2ArgumentParser, CommandSet, Settable, with_argparser

from .engine.config import SETTINGS, setting_names
from .engine.errors import PgError
from .session import Session

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


# ====================================================================== Model
class ModelCommands(CommandSet):
    DEFAULT_CATEGORY = "Model"

    models_parser = parser("List models: the seed families, or every timm/torchvision model matching PATTERN, with "
                           "parameters, input size and whether pretrained weights are here (cached) or need a download.",
                           "models vit_small*")
    models_parser.add_argument("pattern", nargs="?", default="", help="substring or wildcard pattern, e.g. resnet* or dino")

    @with_argparser(models_parser)
    def do_models(self, args):
        """List the models pgshell can load."""
        from tabulate import tabulate
        from .engine.models import list_models

        rows = list_models(args.pattern)
        if not rows:
            raise PgError(f"no model matches {args.pattern!r}: try a shorter pattern, e.g. `models vit`")
        table = [[r["name"], r.get("family", ""), r["source"],
                  f"{r['params'] / 1e6:.1f}M" if r.get("params") else "?", r.get("input_size", ""), r.get("weights", "")]
                 for r in rows]
        self._cmd.poutput(tabulate(table, headers=["model", "family", "source", "params", "input", "weights"]))
        self._cmd.last_result = rows

    load_parser = parser("Build MODEL and give it a new classifier head for the data's classes. Any timm name works, "
                         "torchvision models as tv:NAME, your own as path/file.py:factory.",
                         "load resnet50 --pretrained")
    load_parser.add_argument("model", help="e.g. resnet18, resnet50, mobilenetv3, vit, dino, deit, tv:resnet50")
    src = load_parser.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="the model's pretrained weights (timm hub / torchvision)")
    src.add_argument("--weights", metavar="FILE", completer=cmd2.Cmd.path_complete,
                     help="weights from a local .pth/.safetensors file")
    load_parser.add_argument("--classes", type=int, help="class count when no data is attached yet")

    @with_argparser(load_parser)
    def do_load(self, args):
        """Load a model."""
        if args.weights and not Path(args.weights).is_file():
            raise PgError(f"no weights file {args.weights}")
        msg = self._cmd.session.load_model(args.model, args.pretrained, args.weights or "", args.classes)
        self._cmd.poutput(msg)
        self._cmd.last_result = self._cmd.session.spec.to_dict()

    freeze_parser = parser("Freeze parameters so they are not trained: `backbone` (all but the head — the fixed feature "
                           "extractor), `all`, `none`, or module prefixes (layer1 layer2, blocks.0). BatchNorm "
                           "statistics of frozen parts stay frozen.", "freeze backbone")
    freeze_parser.add_argument("what", nargs="*", default=["backbone"], help="backbone | all | none | PREFIX ...")

    @with_argparser(freeze_parser)
    def do_freeze(self, args):
        """Freeze parts of the model."""
        self._report(self._cmd.session.freeze(args.what))

    unfreeze_parser = parser("Make parameters trainable again: `all` or module prefixes.", "unfreeze layer4")
    unfreeze_parser.add_argument("what", nargs="*", default=["all"], help="all | PREFIX ...")

    @with_argparser(unfreeze_parser)
    def do_unfreeze(self, args):
        """Unfreeze parts of the model."""
        self._report(self._cmd.session.freeze(args.what, unfreeze=True))

    def _report(self, counts):
        trainable, total = counts
        self._cmd.poutput(f"trainable {trainable:,} / {total:,} parameters")
        self._cmd.last_result = {"trainable": trainable, "total": total}


# ====================================================================== Data
class DataCommands(CommandSet):
    DEFAULT_CATEGORY = "Data"

    data_parser = parser("Attach an image folder: class folders (split into train/val by --split), or train/ and val/ "
                         "(and optional test/) folders of class folders. Bad images are listed, not fatal.",
                         "data data/digits --split 0.2 --size 64")
    data_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="the dataset folder")
    data_parser.add_argument("--split", type=float, default=0.2, help="validation fraction when there is no val/ (0.2)")
    data_parser.add_argument("--size", type=int, default=0, help="image size in pixels (default: the model's own)")
    data_parser.add_argument("--check", action="store_true", help="also list every rejected file and why")

    @with_argparser(data_parser)
    def do_data(self, args):
        """Attach a dataset."""
        from tabulate import tabulate

        splits = self._cmd.session.attach_data(args.path, args.split, args.size)
        rows = splits.counts()
        has_test = any(r.get("test") for r in rows)
        cols = ["class", "train", "val"] + (["test"] if has_test else [])
        table = [[r[c] for c in cols] for r in rows]
        table.append(["total"] + [sum(r[c] or 0 for r in rows) for c in cols[1:]])
        self._cmd.poutput(f"{len(splits.classes)} classes ({splits.layout})")
        self._cmd.poutput(tabulate(table, headers=cols))
        if splits.rejected:
            self._cmd.poutput(f"{len(splits.rejected)} file(s) rejected" + ("" if args.check else " (`data PATH --check` lists them)"))
            if args.check:
                self._cmd.poutput(tabulate(splits.rejected, headers=["file", "reason"]))
        self._cmd.last_result = {"classes": splits.classes, "counts": rows, "rejected": splits.rejected}


# ====================================================================== Training
class TrainingCommands(CommandSet):
    DEFAULT_CATEGORY = "Training"

    train_parser = parser("Train N more epochs (or K more batches with --steps) from where the model is. Returns to "
                          "the prompt at once; progress shows in the toolbar. In a script it waits until done.",
                          "train 5")
    train_parser.add_argument("epochs", nargs="?", type=int, help="more epochs (default: up to the `epochs` setting)")
    train_parser.add_argument("--steps", type=int, help="more batches instead of epochs")

    @with_argparser(train_parser)
    def do_train(self, args):
        """Train in the background."""
        if args.epochs is not None and args.steps is not None:
            raise PgError("give epochs or --steps, not both")
        self._cmd.poutput(self._cmd.session.train(args.epochs, args.steps))
        self._cmd.after_start()

    @with_argparser(parser("Pause the run after the current batch (a checkpoint is written).", "pause"))
    def do_pause(self, _):
        """Pause training."""
        s = self._cmd.session
        if not s.running:
            raise PgError("nothing is training" + (" (the run is already paused: `continue`)" if s.paused else ""))
        if not s.pause():
            raise PgError("still finishing the current batch; it will pause after it")
        self._cmd.flush_messages()
        self._cmd.last_result = True

    @with_argparser(parser("Continue the paused run where it stopped.", "continue"))
    def do_continue(self, _):
        """Continue a paused run."""
        self._cmd.poutput(self._cmd.session.resume())
        self._cmd.after_start()

    @with_argparser(parser("Stop the run after the current batch; `continue` will not resume it.", "stop"))
    def do_stop(self, _):
        """Stop training."""
        if not self._cmd.session.stop():
            raise PgError("nothing to stop")
        self._cmd.flush_messages()
        self._cmd.last_result = True

    @with_argparser(parser("Block until the current run finishes or pauses (Ctrl-C pauses it).", "wait"))
    def do_wait(self, _):
        """Wait for training."""
        self._cmd.wait_for_run()


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
                         "continues). Reopen later with `pgshell -s FILE`.", "save sessions/cats.session")
    save_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete, help="NAME.session (default: current)")

    @with_argparser(save_parser)
    def do_save(self, args):
        """Save the session."""
        path = self._cmd.session.save(args.path)
        self._cmd.flush_messages()
        self._cmd.poutput(f"saved {path}")
        self._cmd.last_result = str(path)


# ====================================================================== Analysis
class AnalysisCommands(CommandSet):
    DEFAULT_CATEGORY = "Analysis"

    @with_argparser(parser("Loss and accuracy of the current weights on the validation split (and test, if any).",
                           "eval"))
    def do_eval(self, _):
        """Evaluate the current model."""
        from tabulate import tabulate

        s = self._cmd.session
        results = [s.evaluate("val")]
        if s.splits is not None and s.splits.test:
            results.append(s.evaluate("test"))
        self._cmd.poutput(tabulate([[r["split"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", r["n"]] for r in results],
                                   headers=["split", "loss", "accuracy", "images"]))
        self._cmd.last_result = {r["split"]: {k: r[k] for k in ("loss", "accuracy", "n")} for r in results}


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
    from .engine.config import parse_value

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
                                       AnalysisCommands()],
                         enable_bottom_toolbar=self.interactive, refresh_interval=0.5 if self.interactive else 0.0,
                         persistent_history_file=os.path.expanduser("~/.pgshell_history") if self.interactive else "",
                         suggest_similar_command=True, terminators=[])
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
            return (f" epoch {st['epoch']}  batch {st['batch']}/{st['batches']}  loss {st['loss']:.4f}  "
                    f"acc {st['accuracy']:.3f}  lr {st['lr']:.2g}  {st['rate']:.0f} img/s  ETA {_fmt_secs(st['eta'])}")
        if state == "training":
            return " training: starting…"
        if state == "paused":
            return " paused — `continue` resumes, `save` keeps it" + (f"  ({st['error']})" if st.get("error") else "")
        return None

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
        saved = self.session.close(save=True)
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
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgshell", description="AI Playground: fine-tune pretrained image classifiers.")
    ap.add_argument("plan", nargs="?", help="a plan file to run (default: read commands from stdin / the terminal)")
    ap.add_argument("-s", "--session", help="reopen a saved session: sessions/NAME.session")
    ap.add_argument("--sessions-dir", default=os.environ.get("PGSHELL_SESSIONS", "sessions"),
                    help="where new sessions are saved (default: ./sessions)")
    ap.add_argument("--version", action="version", version=f"pgshell {__import__('pgshell').__version__}")
    args = ap.parse_args(argv)
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
