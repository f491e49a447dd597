"""Analysis commands: eval, plot, predict, export (review.py has errors, explain, probe, compare, checkpoints). They parse, call pgshell.analysis, print."""

from __future__ import annotations

import cmd2
from cmd2 import CommandSet, with_argparser

from .. import analysis as A
from ._common import parser

_CHECKPOINT_HELP = "EPOCH (a number), best, last, or a checkpoint file (`checkpoints` lists them)"


def _f(v, digits=4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


# ====================================================================== Analysis
class AnalysisCommands(CommandSet):
    DEFAULT_CATEGORY = "Analysis"

    eval_parser = parser("Evaluate the current weights, or a saved checkpoint on a model copy of its own (a run in "
                         "progress or paused is left as it is): loss, accuracy, top-5 accuracy (more than 5 classes), "
                         "per-class precision/recall/F1, the confusion matrix and the most confused pairs. Without "
                         "--split: val, and test if there is one.", "eval --checkpoint best --out confusion.png")
    eval_parser.add_argument("--checkpoint", metavar="EPOCH|best|last|PATH", help=_CHECKPOINT_HELP)
    eval_parser.add_argument("--split", choices=("val", "test", "train"), help="the split to evaluate")
    eval_parser.add_argument("--out", metavar="FILE.png", completer=cmd2.Cmd.path_complete,
                             help="write the confusion matrix of the (first) split as a heat map")

    @with_argparser(eval_parser)
    def do_eval(self, args):
        """Evaluate the model or a checkpoint."""
        from tabulate import tabulate

        reports = A.evaluate(self._cmd.session, [args.split] if args.split else None, args.checkpoint)
        p = self._cmd.poutput
        r0 = reports[0]
        where = r0["model"] + (f" (epoch {r0['epoch']}, step {r0['step']})" if r0["step"] is not None else "")
        p(f"{where}")
        p(tabulate([[r["split"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", _f(r["top5"]), r["n"]] for r in reports],
                   headers=["split", "loss", "accuracy", "top-5", "images"]))
        for r in reports:
            p(f"\n{r['split']}: per class")
            rows = [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                    for c in r["per_class"]]
            rows.append(["(macro)", f"{r['macro']['precision']:.3f}", f"{r['macro']['recall']:.3f}",
                         f"{r['macro']['f1']:.3f}", r["n"]])
            p(tabulate(rows, headers=["class", "precision", "recall", "F1", "support"]))
            p(f"\n{r['split']}: confusion matrix (rows: true class, columns: predicted)")
            p(tabulate([[c, *row] for c, row in zip(r["classes"], r["confusion"])], headers=["", *r["classes"]]))
            if r["confused"]:
                p("most confused: " + ", ".join(f"{x['true']} -> {x['predicted']} ({x['count']})"
                                                for x in r["confused"]))
        if args.out:
            p(f"wrote {A.confusion_png(r0, args.out)}")
        self._cmd.last_result = {r["split"]: r for r in reports}

    plot_parser = parser("Graphs from metrics.csv: per-batch training loss/accuracy (raw and smoothed), validation "
                         "points, learning rate (log scale), epoch ends and pause/resume marks (a pause, not a new "
                         "`train` after a finished run). In the terminal, or a PNG with --out. Name session files to "
                         "overlay several runs; --x epoch or time compares runs whose batch sizes differ.",
                         "plot --out runs.png sessions/a.session sessions/b.session")
    plot_parser.add_argument("sessions", nargs="*", metavar="SESSION", completer=cmd2.Cmd.path_complete,
                             help=".session files (default: this session)")
    plot_parser.add_argument("--out", metavar="FILE.png", completer=cmd2.Cmd.path_complete, help="write a PNG")
    plot_parser.add_argument("--smooth", type=int, default=10, metavar="N", help="moving mean over N batches (1: off)")
    plot_parser.add_argument("--metric", choices=("loss", "accuracy", "lr", "all"), default="all")
    plot_parser.add_argument("--trial", default="", metavar="N", help="a tuning trial's rows (default: training)")
    plot_parser.add_argument("--x", choices=("step", "epoch", "time"), default="step",
                             help="horizontal axis: batches, epochs, or seconds of training (default step)")

    @with_argparser(plot_parser)
    def do_plot(self, args):
        """Plot the training curves."""
        res = A.plot(self._cmd.session, args.sessions, args.out, args.smooth, args.metric, args.trial, args.x)
        self._cmd.poutput(f"wrote {res['out']}" if args.out else res["text"])
        self._cmd.last_result = res

    predict_parser = parser("Top-K classes with probabilities for an image or every image in a folder, with the "
                            "model's own eval preprocessing; a table, or a CSV with --out. Under a folder whose "
                            "subfolders are class names, each image's true class and whether the model got it right "
                            "are added (columns true, correct) with the accuracy.",
                            "predict photos/ --top 3 --out predictions.csv")
    predict_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="an image file or a folder")
    predict_parser.add_argument("--top", type=int, default=3, metavar="K", help="classes per image (default 3)")
    predict_parser.add_argument("--out", metavar="FILE.csv", completer=cmd2.Cmd.path_complete, help="write a CSV")
    predict_parser.add_argument("--checkpoint", metavar="EPOCH|best|last|PATH", help=_CHECKPOINT_HELP)

    @with_argparser(predict_parser)
    def do_predict(self, args):
        """Classify images."""
        from tabulate import tabulate

        res = A.predict(self._cmd.session, args.path, args.top, args.checkpoint)
        if args.out:
            self._cmd.poutput(f"wrote {A.write_predictions_csv(res, args.out, args.top)} ({len(res['rows'])} images)")
        else:
            k = min(args.top, len(res["classes"]))
            truth = ["true", "correct"] if res.get("labelled") else []
            table = [[r["path"], *[f"{c} {p:.3f}" for c, p in r["top"]]] if not r["error"]
                     else [r["path"], f"error: {r['error']}", *[""] * (k - 1)] for r in res["rows"]]
            if truth:
                table = [[*t, r["true"], "yes" if r["correct"] else "no"] for t, r in zip(table, res["rows"])]
            self._cmd.poutput(tabulate(table, headers=["image", *[f"#{i}" for i in range(1, k + 1)], *truth]))
        if res.get("labelled"):
            self._cmd.poutput(f"accuracy {res['accuracy']:.4f} on {res['labelled']} images in class folders")
        self._cmd.last_result = res

    export_parser = parser("Write the model (or a checkpoint's) as ONNX or TorchScript, with PATH.json beside it: "
                           "class names and preprocessing (input size, mean/std, interpolation, crop_pct). The written "
                           "file is run once and compared with the PyTorch model.", "export onnx model.onnx")
    export_parser.add_argument("format", choices=("onnx", "torchscript"))
    export_parser.add_argument("path", completer=cmd2.Cmd.path_complete, help="the file to write")
    export_parser.add_argument("--checkpoint", metavar="EPOCH|best|last|PATH", help=_CHECKPOINT_HELP)

    @with_argparser(export_parser)
    def do_export(self, args):
        """Export the model."""
        info = A.export(self._cmd.session, args.format, args.path, args.checkpoint)
        diff = info["check"]["max_abs_diff"]
        check = (f"checked with {info['check']['by']}: max difference {diff:.2g}" if diff is not None
                 else info["check"]["by"])
        self._cmd.poutput(f"wrote {args.path} and {args.path}.json ({check})")
        self._cmd.last_result = info
