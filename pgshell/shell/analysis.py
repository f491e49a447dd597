"""Analysis commands: eval."""

from __future__ import annotations

from cmd2 import CommandSet, with_argparser

from ._common import parser


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
