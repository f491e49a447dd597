"""Data commands: data."""

from __future__ import annotations

import cmd2
from cmd2 import CommandSet, with_argparser

from ._common import parser


# ====================================================================== Data
class DataCommands(CommandSet):
    DEFAULT_CATEGORY = "Data"

    data_parser = parser("Attach an image folder: class folders (split into train/val by --split), or train/ and val/ "
                         "(and optional test/) folders of class folders. Bad images are listed, not fatal.",
                         "data data/digits --split 0.2 --size 64")
    data_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="the dataset folder")
    data_parser.add_argument("--split", type=float, default=0.2, help="validation fraction when there is no val/ (0.2)")
    data_parser.add_argument("--size", type=int, default=0, help="image size in pixels (default: the model's own)")
    data_parser.add_argument("--check", action="store_true",
                             help="also decode every image (slower) and list every rejected file and why")

    @with_argparser(data_parser)
    def do_data(self, args):
        """Attach a dataset."""
        from tabulate import tabulate

        splits = self._cmd.session.attach_data(args.path, args.split, args.size, check=args.check)
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
        for hint in self._cmd.session.data_hints():
            self._cmd.poutput(hint)
        self._cmd.last_result = {"classes": splits.classes, "counts": rows, "rejected": splits.rejected}
