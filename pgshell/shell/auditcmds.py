"""Audit commands: audit (duplicates, leakage, odd images, class balance). They parse, call pgshell.session.dataaudit,
print. (`errors --suspect` is in reviewcmds.py, `data --exclude` in datacmds.py.)"""

from __future__ import annotations

from cmd2 import with_argparser

from ..session import dataaudit as AU
from ._common import Commands, add_out, parser


class AuditCommands(Commands):
    DEFAULT_CATEGORY = "Data"

    audit_parser = parser("Can the data be trusted: exact duplicates (the same bytes) and near-duplicates (a "
                          "perceptual hash; with a pretrained or trained model loaded, also the cosine similarity of "
                          "its features) within "
                          "and across train/val/test, named as leakage (\"3 val images also in train\"); the same "
                          "image under two classes; class counts and imbalance; blank, grey-scale, tiny, huge and "
                          "odd-aspect images. The thresholds are printed. With --out DIR: a contact sheet per "
                          "finding, audit.csv, and exclude.txt for `data --exclude` (of each duplicate group every "
                          "copy but the evaluation split's; blank images). Nothing on disk is changed.",
                          "audit --out audit/", wide=True)
    audit_parser.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                              help="the splits to audit (default all, and across them)")
    add_out(audit_parser, "DIR", "write the contact sheets, audit.csv and exclude.txt there")
    features = audit_parser.add_mutually_exclusive_group()
    features.add_argument("--features", dest="features", action="store_true", default=None,
                          help="compare the model's features too (the default when the loaded model is pretrained, "
                               "loaded from weights or trained)")
    features.add_argument("--no-features", dest="features", action="store_false",
                          help="hashes only (fast: no model pass)")

    @with_argparser(audit_parser)
    def do_audit(self, args):
        """Find duplicates, leakage and odd images in the data."""
        res = AU.audit(self.session, args.split, args.features, args.out)
        app, p = self._cmd, self._cmd.poutput
        p(f"audited {res['images']} images ({args.split}) in {res['seconds']:.1f} s"
          + ("" if res["features"] else " — by hashes only" + (
              "" if self.session.built is None else " (the model's weights are random: `--features` compares its "
                                                    "features all the same)")))
        counts = res["counts"]
        cols = ["class", "train", "val"] + (["test"] if any(r.get("test") is not None for r in counts) else [])
        app.ptable([[r[c] for c in cols] for r in counts], cols, wide=args.wide, wrap=["class"])
        lines = AU.summary_lines(res)
        for line in lines or ["no duplicates, leakage or odd images found"]:
            p(line)
        for kind in ("exact", "near", "features"):
            for n, g in enumerate((res["groups"][kind] or [])[:10], 1):
                p(f"  {kind} #{n}: " + ", ".join(f"{m['split']}:{m['path']}" for m in g))
        if res["bad"]:
            p(f"{len(res['bad'])} image(s) could not be read (`data --check` lists them)")
        p("thresholds: " + "; ".join(f"{k}: {v}" for k, v in res["thresholds"].items()
                                     if res["features"] or "features" not in k))
        if res.get("files"):
            p(f"wrote {len(res['files'])} files to {args.out}; `data --exclude {res['files']['exclude']}` leaves "
              f"out the {len(res['exclude'])} images it lists")
        app.last_result = res
