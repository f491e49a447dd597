"""Review commands: errors, explain, probe, compare, sessions, checkpoints (and `checkpoints prune`).

They parse, call pgshell.analysis, print. Tables are fitted to the terminal's width: lists (compare's differing
settings) are multi-line cells, then the least important columns are left out, and a table that still does not fit
is printed as one block of `name: value` lines per row — a rule line is never wider than the terminal.
"""

from __future__ import annotations

import textwrap

import cmd2
from cmd2 import as_subcommand_to, with_argparser

from ..session import review as A
from ..engine.errors import PgError
from ._common import Commands, add_out, add_sessions, fmt_secs, parser, sub, with_subcommands
from ._table import fit_table
from .analysis import CHECKPOINT_HELP, fnum

def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _at(value, epoch, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f} @{epoch}"


def _fit(app, headers: list[str], rows: list[list], drop: list[str] = ()) -> str:
    """A table that fits the terminal (the shell's one table helper, shell/_table.py)."""
    return fit_table(rows, headers, app.table_width(), drop=drop)


# ====================================================================== Review
class ReviewCommands(Commands):
    DEFAULT_CATEGORY = "Review"

    def _confirm(self, question: str, yes: bool, plan_refusal: str | None) -> bool:
        """--yes, or the user's y; in a plan (nobody to ask) `plan_refusal` is the error, or None to go ahead."""
        if yes:
            return True
        if not self._cmd.interactive:
            if plan_refusal:
                raise PgError(plan_refusal)
            return True
        try:
            answer = self._cmd.read_input(f"{question} [y/N] ")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")

    # ------------------------------------------------------------------ errors
    errors_parser = parser("The images with the highest loss (the model's worst mistakes, and its least sure right "
                           "answers): a table of path, true class, predicted class, its probability and the loss; "
                           "with --out a contact sheet PNG, each tile labelled true / predicted / probability (red "
                           "when wrong; 64 tiles a page: FILE.png, FILE-2.png, ...), and the same rows in FILE.csv "
                           "beside it.",
                           "errors --top 16 --out mistakes.png")
    errors_parser.add_argument("--split", choices=("val", "test", "train"), default="val")
    errors_parser.add_argument("--top", type=int, default=16, metavar="N", help="how many images (default 16)")
    errors_parser.add_argument("--class", dest="cls", metavar="C", help="only images whose true class is C")
    add_out(errors_parser, "FILE.png", "draw a contact sheet (and FILE.csv)")
    errors_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH", help=CHECKPOINT_HELP)
    errors_parser.add_argument("--suspect", action="store_true",
                               help="likely label errors instead (confident learning): the images whose given label "
                                    "the model disbelieves; on train (or with --probe) from out-of-fold predictions "
                                    "of a linear probe on the model's features")
    errors_parser.add_argument("--probe", action="store_true", help="with --suspect: the probe on val/test too")

    @with_argparser(errors_parser)
    def do_errors(self, args):
        """Show the highest-loss images."""
        if args.out and not args.out.lower().endswith(".png"):
            raise PgError(f"--out draws a PNG: give FILE.png, not {args.out}")
        if args.suspect:
            return self._suspects(args)
        res = A.top_losses(self.session, args.split, args.top, args.cls, args.checkpoint)
        p = self._cmd.poutput
        p(f"{res['model']} (epoch {res['epoch']}, step {res['step']}): {len(res['rows'])} highest losses of "
          f"{res['n']} {res['split']} images" + (f" of class {res['class']}" if res["class"] else ""))
        if args.out:
            drawn = A.write_errors(res, args.out)
            pages = drawn["pages"]
            if len(pages) > 1:  # a sheet of hundreds of tiles is pages of A.SHEET_TILES: say which holds which
                n, per = len(res["rows"]), A.SHEET_TILES
                pages = [f"{page} ({k * per + 1}–{min(n, (k + 1) * per)})" for k, page in enumerate(pages)]
            p(f"wrote {', '.join(pages)} and {drawn['csv']}")
            res.update(drawn)
        else:
            rows = [[r["rank"], r["path"], r["true"], r["predicted"], f"{r['probability']:.3f}", f"{r['loss']:.4f}"]
                    for r in res["rows"]]
            p(_fit(self._cmd, ["#", "path", "true", "predicted", "probability", "loss"], rows))
        self._cmd.last_result = res

    def _suspects(self, args):
        from ..session import dataaudit as AU

        res = AU.suspects(self.session, args.split, args.top, args.checkpoint, args.probe, cls=args.cls)
        p = self._cmd.poutput
        p(f"{res['model']}: {res['flagged']} of {res['n']} {res['split']} images flagged as likely label errors by "
          f"confident learning; the {len(res['rows'])} least believed labels first"
          + (f" of class {res['class']}" if res["class"] else ""))
        if res["note"]:
            p(res["note"])
        if args.out:
            drawn = AU.write_suspects(res, args.out)
            p(f"wrote {drawn['out']} and {drawn['csv']}")
            res.update(drawn)
        else:
            rows = [[r["rank"], r["path"], r["true"], r["predicted"], f"{r['probability']:.3f}", f"{r['p_true']:.3f}",
                     "yes" if r["flagged"] else ""] for r in res["rows"]]
            p(_fit(self._cmd, ["#", "path", "given", "believed", "probability", "p_given", "flagged"], rows))
        self._cmd.last_result = res

    # ------------------------------------------------------------------ explain
    explain_parser = parser("Where the model looks: a class-activation map (Grad-CAM by default) of one image for "
                            "a class (default: the predicted one), from the last spatial layer of a convnet or the "
                            "last block of a ViT, placed back on the original image. Drawn over the image with "
                            "--out, else as a coarse map in the terminal. Runs on a copy of the model.",
                            "explain photos/cat1.jpg --class dog --out cam.png")
    explain_parser.add_argument("image", completer=cmd2.Cmd.path_complete, help="an image file")
    explain_parser.add_argument("--class", dest="cls", metavar="C", help="the class to explain (default: predicted)")
    add_out(explain_parser, "FILE.png", "draw the map over the image")
    explain_parser.add_argument("--method", choices=("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"),
                                default="gradcam", help="the CAM method (default gradcam)")
    explain_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH", help=CHECKPOINT_HELP)

    @with_argparser(explain_parser)
    def do_explain(self, args):
        """Show where the model looks."""
        res = A.explain(self.session, args.image, args.cls, args.out, args.checkpoint, args.method)
        p = self._cmd.poutput
        p(f"{args.method} for {res['class']} (p {res['probability']:.3f}; predicted {res['predicted']}) at "
          f"{res['layer']}, {res['model']}")
        if res["empty"]:
            p(f"the map is empty: no part of the image raises the score of {res['class']}")
        p(f"wrote {res['out']}" if args.out else res["text"])
        self._cmd.last_result = res

    # ------------------------------------------------------------------ probe
    probe_parser = parser("A baseline in seconds: the current model's frozen features (the head's input, computed "
                          "once for train and val) classified by a weighted k-NN (DINO's protocol: cosine "
                          "similarity, k nearest, votes weighted exp(sim/0.07)) or by a linear probe (logistic "
                          "regression, L-BFGS, its L2 chosen on a fifth of the training features). Prints the "
                          "validation accuracy — the number a fine-tune must beat — and records it in the session "
                          "(`show`, `compare`).", "probe knn --k 20")
    probe_parser.add_argument("kind", choices=("knn", "linear"), help="knn or linear")
    probe_parser.add_argument("--k", type=int, default=20, help="k-NN: neighbours that vote (default 20)")
    probe_parser.add_argument("--apply", action="store_true", help="linear: the fitted probe becomes the model's "
                              "head, so fine-tuning starts from it (LP-FT); logged, and replayed by a plan")

    @with_argparser(probe_parser)
    def do_probe(self, args):
        """Measure a frozen-feature baseline."""
        r = A.probe(self.session, args.kind, args.k, apply=args.apply)
        how = (f"k {r['k']}, T {r['temperature']}" if r["kind"] == "knn" else f"L2 {r['weight_decay']:g}")
        self._cmd.poutput(f"probe {r['kind']}: val accuracy {r['accuracy']:.4f} ({how}) — {r['train']} train / "
                          f"{r['val']} val features of {r['features']} dims at step {r['step']}; features "
                          f"{r['feature_seconds']:.1f} s, fit {r['fit_seconds']:.2f} s")
        if r.get("head"):
            self._cmd.poutput(f"the probe is now the head ({r['head']}): the model scores {r['accuracy']:.4f} on "
                              "val before any training; `unfreeze all` and `train` fine-tune from it")
        self._cmd.last_result = r

    # ------------------------------------------------------------------ compare
    compare_parser = parser("Sessions side by side, best validation accuracy first: model, pretrained or not, "
                            "data, the settings that differ between them, epochs, best and final validation "
                            "accuracy and loss (@ their epoch), the probes, training time (batches only) and disk. "
                            "Sessions of different data are ranked in tables of their own. Default: every session "
                            "under the sessions folder.",
                            "compare sessions/a.session sessions/b.session --out runs.csv", wide=True)
    add_sessions(compare_parser, "every session", "CSV")

    @with_argparser(compare_parser)
    def do_compare(self, args):
        """Compare sessions."""
        res = A.compare(self.session, args.sessions)
        p = self._cmd.poutput
        p(compare_tables(res, None if args.wide else self._cmd.table_width()))
        for note in res["skipped"]:
            p(f"skipped: {note}")
        if args.out:
            p(f"wrote {A.write_compare_csv(res, args.out)}")
        self._cmd.last_result = res

    # ------------------------------------------------------------------ sessions
    sessions_parser = parser("The saved sessions, last used first: name (* the open one), model, position, best "
                             "validation, size on disk, last used. `sessions rm NAME` deletes a session's file and "
                             "folder (it asks first; in a plan it needs --yes).", "sessions rm old-run --yes",
                             wide=True)
    sessions_rm_parser = sub("Delete a session's file and folder (it asks first; in a plan it needs --yes).")
    sessions_rm_parser.add_argument("name", nargs="?", help="the session's NAME")
    sessions_rm_parser.add_argument("--yes", action="store_true", help="do not ask")

    @with_subcommands(sessions_parser, "[rm]", "subcommands (none: list the sessions)")
    def do_sessions(self, args):
        """List or remove sessions."""
        s, p = self.session, self._cmd.poutput
        res = A.list_sessions(s)
        rows = [[("* " if r["open"] else "") + r["session"], r["model"], _position(r), _best(r["best"]),
                 _size(r["bytes"]), r["last_used"].replace("T", " ")] for r in res["rows"]]
        if rows:
            p(fit_table(rows, ["session", "model", "position", "best val", "size", "last used"],
                        None if args.wide else self._cmd.table_width(), drop=["last used", "model"]))
            p(f"{len(rows)} sessions, {_size(res['bytes'])} in {s.root}")
        else:
            p(f"no sessions under {s.root}")
        for note in res["skipped"]:
            p(f"skipped: {note}")
        for o in res["orphans"]:  # a kill during `fork`, a file deleted by hand: they still hold disk and names
            p(f"orphan folder {o['folder']} ({_size(o['bytes'])}): no session file names it — `sessions rm "
              f"{o['name']}` removes it")
        self._cmd.last_result = res

    @as_subcommand_to("sessions", "rm", sessions_rm_parser, help="delete a session")
    def sessions_rm(self, args):
        if not args.name:
            raise PgError("which session? `sessions rm NAME` (`sessions` lists them)")
        s, p = self.session, self._cmd.poutput
        plan = A.session_removal(s, args.name)
        if not self._confirm(f"delete {plan['session']} ({_size(plan['bytes'])}: {', '.join(plan['paths'])})?",
                             args.yes, "sessions rm deletes files: in a plan add --yes"):
            p("kept")
            self._cmd.last_result = None
            return
        A.remove_session(s, args.name)
        p(f"removed {plan['session']}, freed {_size(plan['bytes'])}" + (f" ({plan['note']})" if plan["note"] else ""))
        self._cmd.last_result = plan

    # ------------------------------------------------------------------ checkpoints
    checkpoints_parser = parser("Every checkpoint of the session, oldest first: kind (epoch end, pause, save), "
                                "epoch, step, validation metrics, size and time; marks the best and the one the "
                                "session resumes from, and prints the folder's size. `checkpoints prune --keep K` "
                                "deletes all but the last K epoch checkpoints, the best and the resume point (it asks "
                                "first when interactive).", "checkpoints prune --keep 2", wide=True)
    checkpoints_prune_parser = sub("Delete all but the last K epoch checkpoints, the best and the resume point (it "
                                   "asks first when interactive).")
    checkpoints_prune_parser.add_argument("--keep", type=int, default=1, metavar="K",
                                          help="epoch checkpoints to keep besides the best and resume point (1)")
    checkpoints_prune_parser.add_argument("--yes", action="store_true", help="do not ask")

    @with_subcommands(checkpoints_parser, "[prune]", "subcommands (none: list the checkpoints)")
    def do_checkpoints(self, args):
        """List or prune the session's checkpoints."""
        s, p = self.session, self._cmd.poutput
        rows = A.list_checkpoints(s)
        if not rows:
            p("no checkpoints yet: one is written at every epoch end, pause and `save`")
        else:
            marks = lambda r: ", ".join(m for m in ("best", "resume") if r[m])  # noqa: E731
            self._cmd.ptable([[r["file"], r["kind"], r["epoch"], r["step"], fnum(r["val_loss"]),
                               fnum(r["val_accuracy"]), _size(r["bytes"]), r["time"], marks(r)] for r in rows],
                             ["file", "kind", "epoch", "step", "val loss", "val acc", "size", "time", ""],
                             wide=args.wide, drop=["time", "size", "kind", "val loss"], wrap=["file"])
            p(f"{len(rows)} checkpoints, {_size(sum(r['bytes'] for r in rows))}; the session folder "
              f"{_size(A.folder_bytes(s.folder))}")
        self._cmd.last_result = rows

    @as_subcommand_to("checkpoints", "prune", checkpoints_prune_parser, help="free space")
    def checkpoints_prune(self, args):
        s, p = self.session, self._cmd.poutput
        plan = A.prune_plan(s, args.keep)
        if not plan["remove"]:
            p("nothing to prune")
        elif self._confirm(f"delete {len(plan['remove'])} checkpoints ({_size(plan['bytes'])})?", args.yes, None):
            done = A.prune_checkpoints(s, args.keep)
            p(f"removed {len(done['remove'])} checkpoints, freed {_size(done['bytes'])}; kept "
              f"{', '.join(done['kept'])}")
            plan = done
        else:
            p("kept")
        self._cmd.last_result = plan


COMPARE_HEADERS = ["session", "model", "pretrained", "data", "settings", "epochs", "best acc", "final acc",
                   "best loss", "final loss", "knn", "linear", "time", "disk"]
_DESCRIBING = ["pretrained", "data", "model"]  # left out when narrow only where every session has the same value
_LOW_VALUE = ["final loss", "best loss", "time", "disk", "final acc", "linear", "knn"]  # left out in this order


def compare_tables(res: dict, width: int | None) -> str:
    """`compare`'s tables: one per dataset (accuracies on different data do not rank), best first. A narrow
    terminal loses the describing columns whose value is the same in every row first, then the low-value figures;
    a column that tells the sessions apart (pretrained or not, the model) is never left out."""
    groups: dict[str, list[dict]] = {}
    for r in res["rows"]:  # already best first
        groups.setdefault(r["data"], []).append(r)
    values = {k: compact_values([r["config"].get(k) for r in res["rows"]]) for k in res["differing"]}
    index = {id(r): i for i, r in enumerate(res["rows"])}
    out = []
    for data, rows in groups.items():
        table = [[r["session"], r["model"], r["pretrained"], r["data"],
                  "\n".join(f"{k}={values[k][index[id(r)]]}" for k in res["differing"]), r["epoch"] or "",
                  _at(r.get("best_accuracy"), r.get("best_accuracy_epoch")),
                  _at(r.get("final_accuracy"), r.get("final_epoch")),
                  _at(r.get("best_loss"), r.get("best_loss_epoch")), _at(r.get("final_loss"), r.get("final_epoch")),
                  fnum(r["probe"].get("knn", {}).get("accuracy")), fnum(r["probe"].get("linear", {}).get("accuracy")),
                  fmt_secs(r["seconds"]), _size(r["bytes"])] for r in rows]
        same = [h for h in _DESCRIBING if len({row[COMPARE_HEADERS.index(h)] for row in table}) == 1]
        if len(groups) > 1:
            out.append(f"data {data or '(none)'}: {len(rows)} session{'s' * (len(rows) != 1)}, best first")
        out.append(fit_table(table, COMPARE_HEADERS, width, drop=same + _LOW_VALUE))
    if len(groups) > 1:
        out.append(f"({len(groups)} datasets: each ranked on its own — accuracies on different data do not compare)")
    return "\n".join(line for text in out for line in (textwrap.wrap(text, width) if width and "\n" not in text
                                                       and len(text) > width else [text]))


def compact_values(values: list) -> list[str]:
    """Values as short text: floats with 3 significant digits (lr=0.00161, not 0.0016051911333587634), more only
    where two different values would otherwise read the same."""
    floats = sorted({v for v in values if isinstance(v, float)})
    digits = 3
    while digits < 17 and len({f"{v:.{digits}g}" for v in floats}) < len(floats):
        digits += 1
    return [f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in values]


def _position(r: dict) -> str:
    """`where`'s words, as `show`, the pause line and the reopen line say it: `epoch 4, batch 18/26 (step 96)`."""
    from types import SimpleNamespace

    from ..session.describe import where

    if r["step"] is None:
        return ""
    return where(SimpleNamespace(epoch=r["epoch"] or 0, batch=r["batch"] or 0, step=r["step"]), r.get("batches"))


def _best(best) -> str:
    if not isinstance(best, dict) or "value" not in best:
        return ""
    metric = {"val_accuracy": "acc", "val_loss": "loss"}.get(best.get("metric"), best.get("metric", ""))
    return f"{metric} {best['value']:.4f} @{best.get('epoch')}"
