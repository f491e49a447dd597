"""Tuning commands: lrfind, tune."""

from __future__ import annotations

import math

import cmd2
from cmd2 import CommandSet, with_argparser

from ..engine.errors import PgError
from ._common import parser

SUGGESTIONS = ("valley", "steepest", "minimum")


class TuningCommands(CommandSet):
    DEFAULT_CATEGORY = "Tuning"

    # ------------------------------------------------------------------ lrfind
    lrfind_parser = parser(
        "Learning-rate range test: train a copy of the model for a few batches while the lr grows exponentially from "
        "--start to --end, stop when the loss diverges, and suggest an lr (fastai's valley; also the steepest descent "
        "and a tenth of the minimum). The session's model, optimizer and position are left exactly as they are. "
        "Runs in the background like `train` (pause/continue/stop work); in a script it waits and prints the curve. "
        "`lrfind show` prints the last curve again, `lrfind apply [valley|steepest|minimum]` sets its lr.",
        "lrfind --steps 100 --out lr.png")
    lrfind_parser.add_argument("action", nargs="?", choices=("show", "apply"), help="show the last result, or apply it")
    lrfind_parser.add_argument("which", nargs="?", choices=SUGGESTIONS, help="apply: which suggestion (default valley)")
    lrfind_parser.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lrfind_parser.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lrfind_parser.add_argument("--steps", type=int, default=100, help="batches at most (default 100)")
    lrfind_parser.add_argument("--out", completer=cmd2.Cmd.path_complete, help="also draw the curve into FILE.png")

    @with_argparser(lrfind_parser)
    def do_lrfind(self, args):
        """Find a learning rate."""
        from ..session import study as T

        app, s = self._cmd, self._cmd.session
        if args.which and args.action != "apply":
            raise PgError(f"`{args.which}` goes with apply: `lrfind apply {args.which}`")
        if args.action == "apply":
            lr = T.apply_lrfind(s, args.which or "valley")
            app.poutput(f"lr ─> {lr:.3g} ({args.which or 'valley'} of the last lrfind)")
            app.last_result = lr
            return
        if args.action == "show":
            result = T.lrfind_result(s)
            if args.out:
                T.write_lrfind_png(result, args.out)
        else:
            app.poutput(T.start_lrfind(s, args.start, args.end, args.steps, args.out))
            app.after_start()
            if app.interactive or s.paused:
                return
            result = T.lrfind_result(s)
        app.poutput(_lr_curve(result))
        app.poutput(f"suggested lr {result['valley']:.2e} (valley); steepest {result['steepest']:.2e}; "
                    f"minimum/10 {result['minimum']:.2e} — `lrfind apply` sets it"
                    + (f"; plot {args.out}" if args.out else ""))
        app.last_result = result

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
    tune_parser.add_argument("action", nargs="?", choices=("show", "apply"), help="list the trials, or apply one")
    tune_parser.add_argument("trial", nargs="?", type=int, help="apply: the trial number (default: the best)")
    tune_parser.add_argument("--trials", type=int, help="how many more trials to finish (default 10)")
    tune_parser.add_argument("--epochs", type=int, help="epochs per trial (default 3, or the study's)")
    tune_parser.add_argument("--steps", type=int, help="batches per trial instead of epochs (one validation at the end)")
    tune_parser.add_argument("--metric", choices=("val_accuracy", "val_loss"), help="what to optimise (default "
                                                                                      "val_accuracy)")
    tune_parser.add_argument("--space", nargs="+", metavar="SPEC", help="NAME=LOW:HIGH[:log] | NAME=A,B | NAME=V | NAME=-")
    tune_parser.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                             help="median (default), halving (successive halving) or none")
    tune_parser.add_argument("--storage", help="an Optuna storage URL instead of sessions/NAME/tune.db")
    tune_parser.add_argument("--study", help="study name (default: the session's name)")

    @with_argparser(tune_parser)
    def do_tune(self, args):
        """Search hyperparameters."""
        from ..session import study as T

        app, s = self._cmd, self._cmd.session
        if args.trial is not None and args.action != "apply":
            raise PgError(f"a trial number goes with apply: `tune apply {args.trial}`")
        if args.action == "apply":
            res = T.apply_trial(s, args.trial, args.storage, args.study)
            settings = " ".join(f"{k}={_short(v)}" for k, v in res["settings"].items())
            freeze = f"; freeze {res['freeze']}" if res["freeze"] else ""
            app.poutput(f"trial {res['trial']} ({res['state']}): set {settings}{freeze}")
            app.last_result = res
            return
        if args.action is None:
            app.poutput(T.start_tune(s, args.trials, args.epochs, args.steps, args.metric,
                                     " ".join(args.space) if args.space else None, args.pruner, args.storage,
                                     args.study))
            app.after_start()
            if app.interactive or s.paused:
                return
        table = T.trials_table(s, args.storage, args.study)
        app.poutput(_trials_text(table))
        app.last_result = table


# ---------------------------------------------------------------------- printing
def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _trials_text(table: dict) -> str:
    from tabulate import tabulate

    unit = "epoch" if "epochs" in table["budget"] else "step"
    rows = []
    for r in table["trials"]:
        v = r["value"]
        rows.append([r["number"], r["state"] + (f" ({r['reason']})" if r["reason"] and r["state"] != "complete" else ""),
                     "" if v is None else f"{v:.4f}", "" if r["reached"] is None else r["reached"],
                     "" if r["duration"] is None else f"{r['duration']:.1f}",
                     " ".join(f"{k}={_short(p)}" for k, p in r["params"].items())])
    head = f"study {table['study']!r}: {len(rows)} trials, {table['direction']} {table['metric']}"
    return head + "\n" + tabulate(rows, headers=["trial", "state", table["metric"], unit, "seconds", "params"])


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
