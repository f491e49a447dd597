"""Tuning commands: lrfind (with `lrfind show|apply`) and tune (with `tune show|apply`), as cmd2 subcommands."""

from __future__ import annotations

import argparse
import math

from cmd2 import as_subcommand_to

from ..engine.errors import PgError
from ._common import Commands, Parser, add_out, add_wide, parser, sub, with_subcommands

SUGGESTIONS = ("valley", "steepest", "minimum")


def _study_options(p: Parser) -> None:
    """--storage/--study on a subcommand too (`tune show --storage URL`); SUPPRESS keeps a value given before the
    subcommand (`tune --storage URL show`) from being overwritten by the subcommand's default."""
    p.add_argument("--storage", default=argparse.SUPPRESS, help="the study's Optuna storage URL")
    p.add_argument("--study", default=argparse.SUPPRESS, help="the study's name")


# `lrfind show valley` and `tune show 3` are caught here to say where the word belongs instead of argparse's
# "unrecognized arguments".
lrfind_show_parser = sub("Print the last range test's curve and suggestions again (and draw it with --out).")
lrfind_show_parser.add_argument("misplaced", nargs="?", choices=SUGGESTIONS, help=argparse.SUPPRESS)
add_out(lrfind_show_parser, "FILE.png", "also draw the curve into FILE.png", default=argparse.SUPPRESS)
lrfind_apply_parser = sub("Set lr to a suggestion of the last range test (default: valley).")
lrfind_apply_parser.add_argument("which", nargs="?", choices=SUGGESTIONS, default="valley",
                                 help="valley (default), steepest or minimum")
tune_show_parser = sub("List the study's trials, best first.")
tune_show_parser.add_argument("misplaced", nargs="?", type=int, help=argparse.SUPPRESS)
_study_options(tune_show_parser)
add_wide(tune_show_parser)
tune_apply_parser = sub("Set the best trial's settings (or trial TRIAL's), and its frozen set.")
tune_apply_parser.add_argument("trial", nargs="?", type=int, help="the trial number (default: the best)")
_study_options(tune_apply_parser)


class TuningCommands(Commands):
    DEFAULT_CATEGORY = "Tuning"

    # ------------------------------------------------------------------ lrfind
    lrfind_parser = parser(
        "Learning-rate range test: train a copy of the model for a few batches while the lr grows exponentially from "
        "--start to --end, stop when the loss diverges, and suggest an lr (fastai's valley; also the steepest descent "
        "and a tenth of the minimum). The session's model, optimizer and position are left exactly as they are. "
        "Runs in the background like `train` (pause/continue/stop work); in a script it waits and prints the curve. "
        "`lrfind show` prints the last curve again, `lrfind apply [valley|steepest|minimum]` sets its lr.",
        "lrfind --steps 100 --out lr.png")
    lrfind_parser.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lrfind_parser.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lrfind_parser.add_argument("--steps", type=int, default=100, help="batches at most (default 100)")
    add_out(lrfind_parser, "FILE.png", "also draw the curve into FILE.png")

    @with_subcommands(lrfind_parser, "[show|apply]", "subcommands (none: run a range test)")
    def do_lrfind(self, args):
        """Find a learning rate."""
        from ..session import study as T

        s = self.session
        self._started(T.start_lrfind(s, args.start, args.end, args.steps, args.out),
                      lambda: self._print_lrfind(T.lrfind_result(s), args.out))
        return None

    @as_subcommand_to("lrfind", "show", lrfind_show_parser, help="print the last range test again")
    def lrfind_show(self, args):
        from ..session import study as T

        if args.misplaced:
            raise PgError(f"`{args.misplaced}` goes with apply: `lrfind apply {args.misplaced}`")
        result = T.lrfind_result(self.session)
        if args.out:
            T.write_lrfind_png(result, args.out)
        self._print_lrfind(result, args.out)

    @as_subcommand_to("lrfind", "apply", lrfind_apply_parser, help="set lr to a suggestion of the last range test")
    def lrfind_apply(self, args):
        from ..session import study as T

        lr = T.apply_lrfind(self.session, args.which)
        self._cmd.poutput(f"lr ─> {lr:.3g} ({args.which} of the last lrfind)")
        self._cmd.last_result = lr

    def _started(self, message: str, print_result) -> None:
        """A background job (lrfind, tune) has started: say so; a script waits for it and prints its result (an
        interactive shell, or a pause, leaves it running)."""
        app = self._cmd
        app.poutput(message)
        app.after_start()
        if not (app.interactive or self.session.paused):
            print_result()

    def _print_lrfind(self, result: dict, out: str | None) -> None:
        self._cmd.poutput(_lr_curve(result))
        self._cmd.poutput(f"suggested lr {result['valley']:.2e} (valley); steepest {result['steepest']:.2e}; "
                          f"minimum/10 {result['minimum']:.2e} — `lrfind apply` sets it" + (f"; plot {out}" if out else ""))
        self._cmd.last_result = result

    # ------------------------------------------------------------------ tune
    tune_parser = parser(
        "Hyperparameter search with Optuna (TPE sampler seeded from `seed`, median pruning on the per-epoch "
        "validation metric). Every trial starts from the model's weights as they were when the study began and "
        "trains on the same data; the session's own model is not changed. --trials N runs N more finished trials "
        "(complete or pruned). The study lives in sessions/NAME/tune.db, so `tune` after a reopen continues it "
        "without repeating trials; --storage URL (e.g. a shared PostgreSQL/MySQL database) lets several machines "
        "work on one study. --space narrows or extends the default space (lr=1e-5:1e-1:log weight_decay=1e-6:1e-2:log "
        "optimizer=sgd,adamw batch_size=16,32,64 freeze=backbone,none label_smoothing=0:0.2): NAME=LOW:HIGH[:log] is "
        "a range, NAME=A,B a choice, NAME=V fixes it, NAME=- leaves it to the session's setting. In the background "
        "like `train`: pause/continue keep the current trial; in a script it waits and prints the table. "
        "`tune show` lists the trials best first; `tune apply [TRIAL]` sets the best (or that) trial's settings.",
        "tune --trials 20 --epochs 3 --space lr=1e-4:1e-1:log optimizer=sgd,adamw")
    tune_parser.add_argument("--trials", type=int, help="how many more trials to finish (default 10)")
    tune_parser.add_argument("--epochs", type=int, help="epochs per trial (default 3, or the study's)")
    tune_parser.add_argument("--steps", type=int, help="optimizer steps per trial instead of epochs (batches unless "
                                                        "`accumulate` > 1; one validation at the end)")
    tune_parser.add_argument("--metric", choices=("val_accuracy", "val_loss"), help="what to optimise (default "
                                                                                      "val_accuracy)")
    tune_parser.add_argument("--space", nargs="+", metavar="SPEC", help="NAME=LOW:HIGH[:log] | NAME=A,B | NAME=V | NAME=-")
    tune_parser.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                             help="median (default), halving (successive halving) or none")
    tune_parser.add_argument("--storage", help="an Optuna storage URL instead of sessions/NAME/tune.db")
    tune_parser.add_argument("--study", help="study name (default: the session's name)")

    @with_subcommands(tune_parser, "[show|apply]", "subcommands (none: run trials)")
    def do_tune(self, args):
        """Search hyperparameters."""
        from ..session import study as T

        s = self.session
        self._started(T.start_tune(s, args.trials, args.epochs, args.steps, args.metric,
                                   " ".join(args.space) if args.space else None, args.pruner, args.storage, args.study),
                      lambda: self._print_trials(T.trials_table(s, args.storage, args.study), wide=False))
        return None

    @as_subcommand_to("tune", "show", tune_show_parser, help="list the trials, best first")
    def tune_show(self, args):
        from ..session import study as T

        if args.misplaced is not None:
            raise PgError(f"a trial number goes with apply: `tune apply {args.misplaced}`")
        self._print_trials(T.trials_table(self.session, args.storage, args.study), args.wide)

    @as_subcommand_to("tune", "apply", tune_apply_parser, help="set the best (or that) trial's settings")
    def tune_apply(self, args):
        from ..session import study as T

        res = T.apply_trial(self.session, args.trial, args.storage, args.study)
        settings = " ".join(f"{k}={_short(v)}" for k, v in res["settings"].items())
        freeze = f"; freeze {res['freeze']}" if res["freeze"] else ""
        self._cmd.poutput(f"trial {res['trial']} ({res['state']}): set {settings}{freeze}")
        self._cmd.last_result = res

    def _print_trials(self, table: dict, wide: bool) -> None:
        unit = "epoch" if "epochs" in table["budget"] else "step"
        self._cmd.poutput(f"study {table['study']!r}: {len(table['trials'])} trials, {table['direction']} "
                          f"{table['metric']}")
        self._cmd.ptable(_trial_rows(table), ["trial", "state", table["metric"], unit, "seconds", "params"],
                         wide=wide, drop=["seconds", unit], wrap=["state", "params"])
        self._cmd.last_result = table


# ---------------------------------------------------------------------- printing
def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _trial_rows(table: dict) -> list[list]:
    rows = []
    for r in table["trials"]:
        v = r["value"]
        rows.append([r["number"], r["state"] + (f" ({r['reason']})" if r["reason"] and r["state"] != "complete" else ""),
                     "" if v is None else f"{v:.4f}", "" if r["reached"] is None else r["reached"],
                     "" if r["duration"] is None else f"{r['duration']:.1f}",
                     " ".join(f"{k}={_short(p)}" for k, p in r["params"].items())])
    return rows


def _lr_curve(result: dict, width: int = 64, height: int = 14) -> str:
    """The smoothed loss against log10(lr) as text: `*` the curve, `v` the valley, `s` the steepest point."""
    pts = [(math.log10(lr), y) for lr, y in zip(result["lrs"], result["smoothed"]) if math.isfinite(y)]
    if len(pts) < 2:
        return "(too few points to draw)"
    lo = min(y for _, y in pts)
    hi = min(max(y for _, y in pts), 4 * lo if lo > 0 else max(y for _, y in pts))
    x0, x1 = pts[0][0], pts[-1][0]
    grid = [[" "] * width for _ in range(height)]

    def col(x):
        return min(width - 1, max(0, round((x - x0) / max(x1 - x0, 1e-12) * (width - 1))))

    for x, y in pts:
        row = round((min(y, hi) - lo) / max(hi - lo, 1e-12) * (height - 1))
        grid[height - 1 - row][col(x)] = "*"
    for key, mark in (("steepest", "s"), ("valley", "v")):
        c = col(math.log10(result[key]))
        for r in range(height):
            if grid[r][c] == " ":
                grid[r][c] = ":" if r else mark
    out = []
    for r in range(height):
        label = f"{hi:9.3f}" if r == 0 else f"{lo:9.3f}" if r == height - 1 else " " * 9
        out.append(f"{label} |" + "".join(grid[r]))
    out.append(" " * 10 + "+" + "-" * width)
    out.append(" " * 11 + f"lr {10 ** x0:.0e}".ljust(width - 9) + f"{10 ** x1:.0e}")
    return "smoothed loss (v: valley, s: steepest)\n" + "\n".join(out)
