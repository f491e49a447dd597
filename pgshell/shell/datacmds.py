"""Data commands: data."""

from __future__ import annotations

import textwrap

import cmd2
from cmd2 import with_argparser

from ..engine.errors import PgError
from ..engine.names import escape, folded
from ._common import Commands, parser


# ====================================================================== Data
class DataCommands(Commands):
    DEFAULT_CATEGORY = "Data"

    data_parser = parser("Attach a dataset: an image folder of class folders (split into train/val by --split), or of "
                         "train/ and val/ (and optional test/) folders of class folders; a label file (.csv with a "
                         "header, or .jsonl) with the columns path, label and optionally split (train, val, test); "
                         "a Hugging Face dataset, hf:NAME[:CONFIG] from the local datasets cache or a folder written "
                         "by save_to_disk, its train/validation/test splits used as such. Without a validation split, "
                         "--split of each class is held out. Bad images are listed, not fatal. A path with spaces: "
                         "quote it or escape them (my\\ data). The same data again changes nothing; other data, once "
                         "the session has trained, starts a new run of it (steps count on, its checkpoints stay). "
                         "When the data changed since the session was saved, --keep trains on with the recorded "
                         "images that still exist.",
                         "data data/digits --split 0.2 --size 64", wide=True)
    data_parser.add_argument("path", nargs="?", completer=cmd2.Cmd.path_complete,
                             help="a folder, labels.csv / labels.jsonl, hf:NAME[:CONFIG] or a save_to_disk folder "
                                  "(default: the session's)")
    data_parser.add_argument("--split", type=float, default=0.2, help="validation fraction when there is no val/ (0.2)")
    data_parser.add_argument("--size", type=int, default=0, help="image size in pixels (default: the model's own)")
    data_parser.add_argument("--root", metavar="DIR", completer=cmd2.Cmd.path_complete,
                             help="where a label file's relative paths start (default: the file's folder)")
    data_parser.add_argument("--allow-outside", action="store_true",
                             help="a label file may name images outside --root (refused by default)")
    data_parser.add_argument("--check", action="store_true",
                             help="also decode every image (slower) and list every rejected file and why")
    data_parser.add_argument("--exclude", metavar="FILE", completer=cmd2.Cmd.path_complete,
                             help="leave out the files listed in FILE (`audit --out DIR` writes DIR/exclude.txt); "
                                  "nothing on disk is moved or deleted, the session and its change log record the "
                                  "names")
    data_parser.add_argument("--keep", action="store_true",
                             help="the session's recorded file lists, less the files gone: the run goes on")

    @with_argparser(data_parser)
    def do_data(self, args):
        """Attach a dataset."""
        try:
            splits = self.session.attach_data(args.path, args.split, args.size, check=args.check,
                                              root=args.root, keep=args.keep, allow_outside=args.allow_outside,
                                              exclude=args.exclude)
        except PgError as e:  # a folder with nothing to train on: --check shows what the scan left out, and why
            if args.check and getattr(e, "rejected", None):
                self._print_rejected(e.rejected, args.wide)
            raise
        self._cmd.flush_messages()  # a new run, images gone: said before the table
        rows = splits.counts()
        has_test = any(r.get("test") for r in rows)
        cols = ["class", "train", "val"] + (["test"] if has_test else [])
        table = [[folded(r[c]) if c == "class" else r[c] for c in cols] for r in rows]  # a 5,000-char label
        table.append(["total"] + [sum(r[c] or 0 for r in rows) for c in cols[1:]])
        self._cmd.poutput(f"{len(splits.classes)} classes ({splits.layout})")
        self._cmd.ptable(table, cols, wide=args.wide, wrap=["class"])
        if splits.rejected:
            self._cmd.poutput(f"{len(splits.rejected)} file(s) rejected"
                              + ("" if args.check else " (`data PATH --check` lists them)"))
            if args.check:
                self._print_rejected(splits.rejected, args.wide)
        if args.check:  # the audit's short form: hashes only
            from ..session.dataaudit import audit, summary_lines

            found = summary_lines(audit(self.session, features=False))
            self._cmd.poutput("audit: " + ("; ".join(found) + " — `audit` for details" if found else
                                           "no duplicates, leakage or odd images"))
        width = None if args.wide else self._cmd.table_width()
        for hint in self.session.data_hints():  # wrapped to the terminal like the tables
            self._cmd.poutput(textwrap.fill(hint, width, break_on_hyphens=False) if width else hint)
        self._cmd.last_result = {"classes": splits.classes, "counts": rows, "rejected": splits.rejected}

    def _print_rejected(self, rejected, wide: bool) -> None:
        self._cmd.ptable([(escape(p), escape(r)) for p, r in rejected], ["file", "reason"], wide=wide,
                         wrap=["file", "reason"])
