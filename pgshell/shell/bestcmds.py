"""The best model from what was trained: soup (checkpoint averaging), report (one page per session) and autofit (a
time-budgeted search). They parse, call pgshell.session.best / autofit, print."""

from __future__ import annotations

from cmd2 import with_argparser

from ._common import Commands, add_out, parser


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


class BestCommands(Commands):
    DEFAULT_CATEGORY = "Best model"

    soup_parser = parser(
        "Average the weights of the run's epoch checkpoints into one model (a \"model soup\", Wortsman et al. 2022). "
        "--greedy (default): the checkpoints sorted by validation accuracy, each added only if the soup's validation "
        "accuracy does not drop; --uniform: all of them. BatchNorm statistics that differ between the checkpoints are "
        "recomputed on training images. Written as checkpoints/soup.safetensors: `eval --checkpoint soup`, `export "
        "... --checkpoint soup`, `predict ... --checkpoint soup`, `fork NAME --checkpoint soup`.",
        "soup --greedy --top 5", wide=True)
    how = soup_parser.add_mutually_exclusive_group()
    how.add_argument("--greedy", dest="mode", action="store_const", const="greedy",
                     help="add a checkpoint only if validation accuracy does not drop (default)")
    how.add_argument("--uniform", dest="mode", action="store_const", const="uniform", help="average all of them")
    soup_parser.add_argument("--top", type=int, metavar="K", help="only the K best epochs by validation accuracy")
    soup_parser.add_argument("--checkpoints", nargs="+", metavar="EPOCH|PATH",
                             help="these checkpoints instead of every epoch's (epoch numbers or files)")

    @with_argparser(soup_parser)
    def do_soup(self, args):
        """Average checkpoints into one model."""
        from ..session import best as B

        res = B.soup(self.session, args.mode or "greedy", args.top, args.checkpoints)
        app = self._cmd
        rows = [[t["file"], t["epoch"], _pct(t["val_accuracy"]), _pct(t["soup_accuracy"]), "yes" if t["kept"] else
                 "no"] for t in res["tried"]]
        app.ptable(rows, ["checkpoint", "epoch", "val acc", "soup val acc", "in the soup"], wide=args.wide)
        app.poutput(_soup_line(res))
        app.last_result = res


    report_parser = parser(
        "One page about this session: the data, the runs and their settings (the change log, checkpoints, probes, "
        "trials, autofit's choices), the curves, the best model's (the soup's when it is at least as good) "
        "accuracy, per-class figures and confusion matrix on val (and test), the highest-loss images, and how to "
        "export it. HTML (one file, images embedded) or Markdown; the images are also written beside it, in "
        "NAME_files/.", "report --out report.html")
    add_out(report_parser, "FILE.html|FILE.md", "where to write it (default: the session folder's report.html)")

    @with_argparser(report_parser)
    def do_report(self, args):
        """Write a report of the session."""
        from ..session.report import write_report

        res = write_report(self.session, args.out)
        self._cmd.poutput(f"wrote {res['out']} ({len(res['sections'])} sections, {len(res['images'])} images; "
                          f"the model shown: {res['best']['why']})")
        self._cmd.last_result = res

    autofit_parser = parser(
        "The best model within a wall-clock budget: a recipe chosen from the data and the model (image size, class "
        "balance, pretrained or not), then a linear probe baseline, the head alone (pretrained weights), lrfind, a "
        "short Optuna search over lr, crop scale and label smoothing (study NAME-autofit), the best of them trained "
        "in the session (logged as ordinary `set`s and `train`), and the greedy soup of that run. Runs in the "
        "background: pause/continue work; after a quit, `autofit` continues it. Ends inside the budget and says "
        "what it chose and why.", "autofit --budget 10m")
    autofit_parser.add_argument("--budget", metavar="TIME", help="10m, 90s, 1h30m or seconds (default 10m)")
    autofit_parser.add_argument("--metric", choices=("val_accuracy", "val_loss"),
                                help="what the trials are compared by (default val_accuracy)")
    autofit_parser.add_argument("--new", action="store_true",
                                help="start another autofit even if the last one did not finish")

    @with_argparser(autofit_parser)
    def do_autofit(self, args):
        """Find the best model within a time budget."""
        from ..session.autofit import read_state, start_autofit

        app, s = self._cmd, self.session
        app.poutput(start_autofit(s, args.budget, args.metric, args.new))
        app.after_start()
        state = read_state(s)
        if not app.interactive and state is not None:
            app.last_result = state
        return None


def _soup_line(res: dict) -> str:
    n, single = len(res["members"]), res["best_single"]
    line = (f"{res['mode']} soup of {n} checkpoint{'s' * (n != 1)}: val accuracy {_pct(res['val']['accuracy'])} "
            f"(best single {single['file']}: {_pct(single['val_accuracy'])})")
    if res["test"]:
        line += f"; test {_pct(res['test']['accuracy'])} (best single {_pct(single['test_accuracy'])})"
    if res["bn"]["layers"]:
        line += (f"; BatchNorm statistics of {res['bn']['layers']} layers recomputed on {res['bn']['images']} "
                 "training images")
    return line + f"\nwrote {res['path']} — `eval --checkpoint soup`, `export timm DIR --checkpoint soup`"
