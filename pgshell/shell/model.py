"""Model commands: models, load, freeze, unfreeze."""

from __future__ import annotations

from pathlib import Path

import cmd2
from cmd2 import CommandSet, with_argparser

from ..engine.errors import PgError
from ._common import parser


# ====================================================================== Model
class ModelCommands(CommandSet):
    DEFAULT_CATEGORY = "Model"

    models_parser = parser("List models: the seed families, or every timm/torchvision model matching PATTERN, with "
                           "parameters, input size and whether pretrained weights are here (cached) or need a download.",
                           "models vit_small*")
    models_parser.add_argument("pattern", nargs="?", default="", help="substring or wildcard pattern, e.g. resnet* or dino")

    @with_argparser(models_parser)
    def do_models(self, args):
        """List the models pgshell can load."""
        from tabulate import tabulate

        rows = self._cmd.session.list_models(args.pattern)
        if not rows:
            raise PgError(f"no model matches {args.pattern!r}: try a shorter pattern, e.g. `models vit`")
        table = [[r["name"], r.get("family", ""), r["source"],
                  f"{r['params'] / 1e6:.1f}M" if r.get("params") else "?", r.get("input_size", ""), r.get("weights", "")]
                 for r in rows]
        self._cmd.poutput(tabulate(table, headers=["model", "family", "source", "params", "input", "weights"]))
        self._cmd.last_result = rows

    load_parser = parser("Build MODEL and give it a new classifier head for the data's classes. Any timm name works, "
                         "torchvision models as tv:NAME, your own as path/file.py:factory.",
                         "load resnet50 --pretrained")
    load_parser.add_argument("model", help="e.g. resnet18, resnet50, mobilenetv3, vit, dino, deit, tv:resnet50")
    src = load_parser.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="the model's pretrained weights (timm hub / torchvision)")
    src.add_argument("--weights", metavar="FILE", completer=cmd2.Cmd.path_complete,
                     help="weights from a local .pth/.safetensors file")
    load_parser.add_argument("--classes", type=int, help="class count when no data is attached yet")

    @with_argparser(load_parser)
    def do_load(self, args):
        """Load a model."""
        if args.weights and not Path(args.weights).is_file():
            raise PgError(f"no weights file {args.weights}")
        msg = self._cmd.session.load_model(args.model, args.pretrained, args.weights or "", args.classes)
        self._cmd.poutput(msg)
        self._cmd.last_result = self._cmd.session.spec.to_dict()

    freeze_parser = parser("Freeze parameters so they are not trained: `backbone` (all but the head — the fixed feature "
                           "extractor), `all`, `none`, or module prefixes (layer1 layer2, blocks.0). BatchNorm "
                           "statistics of frozen parts stay frozen.", "freeze backbone")
    freeze_parser.add_argument("what", nargs="*", default=["backbone"], help="backbone | all | none | PREFIX ...")

    @with_argparser(freeze_parser)
    def do_freeze(self, args):
        """Freeze parts of the model."""
        self._report(self._cmd.session.freeze(args.what))
        warning = self._cmd.session.random_backbone_warning()
        if warning:
            self._cmd.poutput(warning)

    unfreeze_parser = parser("Make parameters trainable again: `all` or module prefixes.", "unfreeze layer4")
    unfreeze_parser.add_argument("what", nargs="*", default=["all"], help="all | PREFIX ...")

    @with_argparser(unfreeze_parser)
    def do_unfreeze(self, args):
        """Unfreeze parts of the model."""
        self._report(self._cmd.session.freeze(args.what, unfreeze=True))

    def _report(self, counts):
        trainable, total = counts
        self._cmd.poutput(f"trainable {trainable:,} / {total:,} parameters")
        self._cmd.last_result = {"trainable": trainable, "total": total}
