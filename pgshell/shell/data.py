"""Data commands: data."""

from __future__ import annotations

import cmd2
from cmd2 import CommandSet, with_argparser

from ..engine.names import escape
from ._common import parser


# ====================================================================== Data
class DataCommands(CommandSet):
    DEFAULT_CATEGORY = "Data"

    data_parser = parser("Attach an image folder: class folders (split into train/val by --split), or train/ and val/ "
                         "(and optional test/) folders of class folders. Bad images are listed, not fatal. The same "
                         "data again changes nothing; other data, once the session has trained, starts a new run of "
                         "it (steps count on, its checkpoints stay). When the folder changed since the session was "
                         "saved, --keep trains on with the recorded images that still exist.",
                         "data data/digits --split 0.2 --size 64")
    data_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete,
                             help="the dataset folder (default: the session's)")
    data_parser.add_argument("--split", type=float, default=0.2, help="validation fraction when there is no val/ (0.2)")
    data_parser.add_argument("--size", type=int, default=0, help="image size in pixels (default: the model's own)")
    data_parser.add_argument("--check", action="store_true",
                             help="also decode every image (slower) and list every rejected file and why")
    data_parser.add_argument("--keep", action="store_true",
                             help="the session's recorded file lists, less the files gone: the run goes on")

    @with_argparser(data_parser)
    def do_data(self, args):
        """Attach a dataset."""
        from tabulate import tabulate

        splits = self._cmd.session.attach_data(args.path, args.split, args.size, check=args.check, keep=args.keep)
        self._cmd.flush_messages()  # a new run, images gone: said before the table
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
                self._cmd.poutput(tabulate([(escape(p), escape(r)) for p, r in splits.rejected],
                                           headers=["file", "reason"]))
        self._cmd.last_result = {"classes": splits.classes, "counts": rows, "rejected": splits.rejected}
