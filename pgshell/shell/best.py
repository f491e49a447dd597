"""The best model from what was trained: soup (checkpoint averaging), report (one page per session) and autofit (a
time-budgeted search). They parse, call pgshell.session.best / autofit, print."""

from __future__ import annotations

import cmd2
from cmd2 import with_argparser

from ..engine.errors import PgError
from ._common import Commands, parser


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
