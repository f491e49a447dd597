"""Analysis commands: eval, plot, predict, export (review.py has errors, explain, probe, compare, checkpoints). They
parse, call pgshell.session.review, print."""

from __future__ import annotations

import sys

import cmd2
from cmd2 import with_argparser

from ..session import review as A
from ..session.describe import evaluated_line
from ._common import Commands, add_sessions, parser
from ._table import fit_table

CHECKPOINT_HELP = ("EPOCH (a number), step:N (a pause, save or epoch end at step N), best, last, soup, or a checkpoint "
                    "file (`checkpoints` lists them)")


def fnum(v, digits=4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


# ====================================================================== Analysis
class AnalysisCommands(Commands):
    DEFAULT_CATEGORY = "Analysis"

    eval_parser = parser("Evaluate the current weights, or a saved checkpoint on a model copy of its own (a run in "
                         "progress or paused is left as it is): loss, accuracy, top-5 accuracy (more than 5 classes), "
                         "per-class precision/recall/F1, the confusion matrix and the most confused pairs. Without "
                         "--split: val, and test if there is one.", "eval --checkpoint best --out confusion.png",
                         wide=True)
    eval_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH", help=CHECKPOINT_HELP)
    eval_parser.add_argument("--split", choices=("val", "test", "train"), help="the split to evaluate")
    eval_parser.add_argument("--weights", choices=("live", "ema"), default="live",
                             help="the trained weights (live) or their moving average (ema, with `set ema`)")
    eval_parser.add_argument("--tta", choices=("none", "flip"),
                             help="test-time augmentation: flip = the mean of the logits of each image and its mirror "
                                  "image (default: the `tta` setting)")
    eval_parser.add_argument("--out", metavar="FILE.png", completer=cmd2.Cmd.path_complete,
                             help="write the confusion matrix of the (first) split as a heat map")

    @with_argparser(eval_parser)
    def do_eval(self, args):
        """Evaluate the model or a checkpoint."""
        reports = A.evaluate(self.session, [args.split] if args.split else None, args.checkpoint, args.weights,
                             args.tta)
        app, p = self._cmd, self._cmd.poutput
        r0 = reports[0]
        p(evaluated_line(self.session, r0))
        top5 = any(r["top5"] is not None for r in reports)  # top-5 of 5 classes or fewer is always 1: left out
        app.ptable([[r["split"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", *([fnum(r["top5"])] if top5 else []),
                     r["n"]]
                    for r in reports], ["split", "loss", "accuracy", *(["top-5"] if top5 else []), "images"],
                   wide=args.wide)
        if r0.get("label_smoothing"):  # the loss the model trained on, not plain cross-entropy: comparable with
            p(f"(the loss includes label smoothing {r0['label_smoothing']:g}, as training's does)")  # the run's rows
        for r in reports:
            p(f"\n{r['split']}: per class")
            rows = [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                    for c in r["per_class"]]
            rows.append(["(macro)", f"{r['macro']['precision']:.3f}", f"{r['macro']['recall']:.3f}",
                         f"{r['macro']['f1']:.3f}", r["n"]])
            app.ptable(rows, ["class", "precision", "recall", "F1", "support"], wide=args.wide, drop=["support"],
                       wrap=["class"])
            p(f"\n{r['split']}: confusion matrix (rows: true class, columns: predicted)")
            p(_confusion_text(r, None if args.wide else app.table_width()))
            if r["confused"]:
                p("most confused: " + ", ".join(f"{x['true']} -> {x['predicted']} ({x['count']})"
                                                for x in r["confused"]))
        if args.out:
            p(f"wrote {A.confusion_png(r0, args.out)}")
        app.last_result = {r["split"]: r for r in reports}

    plot_parser = parser("Graphs from metrics.csv: per-batch training loss/accuracy (raw and smoothed), validation "
                         "points, learning rate (log scale), epoch ends and pause/resume marks (a pause, not a new "
                         "`train` after a finished run). In the terminal, or a PNG with --out. Name session files to "
                         "overlay several runs; --x epoch or time compares runs whose batch sizes differ.",
                         "plot --out runs.png sessions/a.session sessions/b.session")
    add_sessions(plot_parser, "this session", "PNG")
    plot_parser.add_argument("--smooth", type=int, default=10, metavar="N", help="moving mean over N batches (1: off)")
    plot_parser.add_argument("--metric", choices=("loss", "accuracy", "lr", "all"), default="all")
    plot_parser.add_argument("--trial", default="", metavar="N", help="a tuning trial's rows (default: training)")
    plot_parser.add_argument("--x", choices=("step", "epoch", "time"), default="step",
                             help="horizontal axis: batches, epochs, or seconds of training (default step)")

    @with_argparser(plot_parser)
    def do_plot(self, args):
        """Plot the training curves."""
        res = A.plot(self.session, args.sessions, args.out, args.smooth, args.metric, args.trial, args.x)
        self._cmd.poutput(f"wrote {res['out']}" if args.out else res["text"])
        for name, n in res["skipped"].items():
            self._cmd.poutput(f"({name}: {n} unreadable metrics row{'s' * (n != 1)} skipped)")
        self._cmd.last_result = res

    predict_parser = parser("Top-K classes with probabilities for an image or every image in a folder, with the "
                            "model's own eval preprocessing; a table, or a CSV with --out. Under a folder whose "
                            "subfolders are class names, each image's true class and whether the model got it right "
                            "are added (columns true, correct) with the accuracy.",
                            "predict photos/ --top 3 --out predictions.csv", wide=True)
    predict_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="an image file or a folder")
    predict_parser.add_argument("--top", type=int, default=3, metavar="K", help="classes per image (default 3)")
    predict_parser.add_argument("--out", metavar="FILE.csv", completer=cmd2.Cmd.path_complete, help="write a CSV")
    predict_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH", help=CHECKPOINT_HELP)

    @with_argparser(predict_parser)
    def do_predict(self, args):
        """Classify images."""
        res = A.predict(self.session, args.path, args.top, args.checkpoint)
        if args.out:
            self._cmd.poutput(f"wrote {A.write_predictions_csv(res, args.out, args.top)} ({len(res['rows'])} images)")
        else:
            k = min(args.top, len(res["classes"]))
            truth = ["true", "correct"] if res.get("labelled") else []
            table = [[r["path"], *[f"{c} {p:.3f}" for c, p in r["top"]]] if not r["error"]
                     else [r["path"], f"error: {r['error']}", *[""] * (k - 1)] for r in res["rows"]]
            ranks = [f"#{i}" for i in range(1, k + 1)]
            if truth:
                table = [[*t, r["true"], "yes" if r["correct"] else "no"] for t, r in zip(table, res["rows"])]
            self._cmd.ptable(table, ["image", *ranks, *truth], wide=args.wide, drop=ranks[:0:-1], wrap=["image"])
        if res.get("labelled"):
            self._cmd.poutput(f"accuracy {res['accuracy']:.4f} on {res['labelled']} images in class folders")
        self._cmd.last_result = res

    export_parser = parser("Write the model (or a checkpoint's) as ONNX or TorchScript, with PATH.json beside it: "
                           "class names and preprocessing (input size, mean/std, interpolation, crop_pct); or as timm "
                           "publishes one: `export timm FOLDER` writes model.safetensors + config.json (architecture, "
                           "class names, the preprocessing used), which timm.create_model, `load FOLDER` and the "
                           "Hugging Face Hub take. The written files are run once and compared with the PyTorch model. "
                           "`export plan FILE` writes a plan that rebuilds this session from nothing and replays its "
                           "change log to where it is now (`pgshell FILE` in a new process: the same weights and "
                           "metrics rows on CPU); it names any line that cannot replay exactly, and why.",
                           "export onnx model.onnx")
    export_parser.add_argument("format", choices=("onnx", "torchscript", "timm", "plan"))
    export_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="the file to write (timm: a folder)")
    export_parser.add_argument("--checkpoint", metavar="EPOCH|step:N|best|last|PATH", help=CHECKPOINT_HELP)

    @with_argparser(export_parser)
    def do_export(self, args):
        """Export the model, or a plan that replays the session."""
        if args.format == "plan":
            return self._export_plan(args)
        if args.format == "timm":
            info = A.export_timm(self.session, args.path, args.checkpoint)
            written = f"{args.path}/model.safetensors and {args.path}/config.json"
        else:
            info = A.export(self.session, args.format, args.path, args.checkpoint)
            written = f"{args.path} and {args.path}.json"
        diff = info["check"]["max_abs_diff"]
        check = (f"checked with {info['check']['by']}: max difference {diff:.2g}" if diff is not None
                 else info["check"]["by"])
        self._cmd.poutput(f"wrote {written} ({check})")
        self._cmd.last_result = info

    def _export_plan(self, args):
        from ..engine.errors import PgError
        from ..session import replay as R

        if args.checkpoint:
            raise PgError("a plan replays the session to where it is now: `fork NAME --checkpoint X` first to "
                          "replay up to a checkpoint")
        res = R.export_plan(self.session, args.path)
        self._cmd.poutput(f"wrote {res['path']}: {res['lines']} lines replaying {res['changes']} changes to step "
                          f"{res['step']}" + (f" — {len(res['warnings'])} cannot replay exactly:" if res["warnings"]
                                              else ""))
        for w in res["warnings"]:  # said, not failed: the plan is written, and a script goes on
            self._cmd.print_to(sys.stderr, f"warning: {w}")
        self._cmd.last_result = res


def _confusion_text(r: dict, width: int | None) -> str:
    """The confusion matrix as a table that fits: class names as column headers, else column numbers (the rows say
    which class each number is), else a pointer to `--wide` and the heat map."""
    classes, matrix = r["classes"], r["confusion"]
    text = fit_table([[c, *row] for c, row in zip(classes, matrix)], ["", *classes], width, wrap=[], records=False)
    text = text or fit_table([[f"{i} {c}", *row] for i, (c, row) in enumerate(zip(classes, matrix))],
                             ["", *map(str, range(len(classes)))], width, wrap=[0], records=False)
    return text or (f"({len(classes)} classes do not fit {width} columns: `eval --wide` prints the matrix, "
                    f"`eval --out FILE.png` draws it)")
