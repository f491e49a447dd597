"""Model commands: models, load, freeze, unfreeze."""

from __future__ import annotations

import os
from pathlib import Path

import cmd2
from cmd2 import with_argparser
from cmd2.completion import Completions

from ..engine.errors import PgError
from ._common import Commands, parser


def _is_py_or_dir(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(".py")


# ====================================================================== Model
class ModelCommands(Commands):
    DEFAULT_CATEGORY = "Model"

    models_parser = parser("List models: the seed families, or every timm/torchvision model matching PATTERN, with "
                           "parameters, input size and whether pretrained weights are here (cached) or need a download.",
                           "models vit_small*", wide=True)
    models_parser.add_argument("pattern", nargs="?", default="", help="substring or wildcard pattern, e.g. resnet* or dino")

    @with_argparser(models_parser)
    def do_models(self, args):
        """List the models pgshell can load."""
        rows = self.session.list_models(args.pattern)
        if not rows:
            raise PgError(f"no model matches {args.pattern!r}: try a shorter pattern, e.g. `models vit`")
        table = [[r["name"], r.get("family", ""), r["source"],
                  f"{r['params'] / 1e6:.1f}M" if r.get("params") else "?", r.get("input_size", ""), r.get("weights", "")]
                 for r in rows]
        self._cmd.ptable(table, ["model", "family", "source", "params", "input", "weights"], wide=args.wide,
                         drop=["family", "source", "input"], wrap=["model"])
        if any(r.get("weights") == "not cached" for r in rows):
            self._cmd.poutput("not cached: no network here, so --pretrained finds them only in the local cache — copy "
                              "them into $HF_HOME/hub (timm) or $TORCH_HOME/hub/checkpoints (torchvision) from a "
                              "machine that has them, or load a file with --weights FILE")
        self._cmd.last_result = rows

    def complete_model(self, text: str, line: str, begidx: int, endidx: int) -> Completions:
        """`load` completes the seed short names, then timm's names and `tv:` names, then `.py` files (for
        `file.py:factory`); a word that looks like a path completes files and folders only."""
        app = self._cmd
        if text.startswith((".", "/", "~")) or "/" in text:
            return app.path_complete(text, line, begidx, endidx, path_filter=_is_py_or_dir)
        from ..engine.models.namecache import model_names

        names = app.basic_complete(text, line, begidx, endidx, model_names(), sort=False)
        if not names:
            return app.path_complete(text, line, begidx, endidx, path_filter=_is_py_or_dir)
        files = app.path_complete(text, line, begidx, endidx, path_filter=lambda p: p.endswith(".py"))
        return Completions(items=[*names, *files], is_sorted=True)

    load_parser = parser("Build MODEL and give it a new classifier head for the data's classes. Any timm name works, "
                         "torchvision models as tv:NAME, your own as path/file.py:factory; a Hub repo as "
                         "hf-hub:ORG/NAME and a model folder (timm's config.json + model.safetensors, as `export "
                         "timm` writes) load with their weights. --weights reads any torch.save or safetensors file "
                         "(.pth, .th, .pth.tar, .ckpt, ...), or a model folder, by its content. Tab completes the "
                         "names.",
                         "load resnet50 --pretrained")
    load_parser.add_argument("model", completer=complete_model, suppress_tab_hint=True,
                             help="e.g. resnet18, resnet50, mobilenetv3, vit, dino, deit, tv:resnet50, "
                                  "hf-hub:ORG/NAME, exports/cats")
    src = load_parser.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="the model's pretrained weights (timm hub / torchvision)")
    src.add_argument("--weights", metavar="FILE", completer=cmd2.Cmd.path_complete,
                     help="weights from a local file (torch.save or safetensors, any name) or model folder")
    load_parser.add_argument("--classes", type=int, help="class count when no data is attached yet")

    @with_argparser(load_parser)
    def do_load(self, args):
        """Load a model."""
        if args.weights and not Path(args.weights).expanduser().exists():
            raise PgError(f"no weights file {args.weights}")
        # a hub repo or a model folder names weights, not just an architecture: they load without --pretrained
        names_weights = (args.model.lower().startswith(("hf-hub:", "hf_hub:", "local-dir:"))
                         or (Path(args.model).expanduser() / "config.json").is_file())
        pretrained = args.pretrained or (names_weights and not args.weights)
        msg = self.session.load_model(args.model, pretrained, args.weights or "", args.classes)
        self._cmd.flush_messages()  # a new run of the session: said first
        self._cmd.poutput(msg)
        self._cmd.last_result = self.session.spec.to_dict()

    freeze_parser = parser("Freeze parameters so they are not trained: `backbone` (all but the head — the fixed feature "
                           "extractor), `all`, `none`, or module prefixes (layer1 layer2, blocks.0). BatchNorm "
                           "statistics of frozen parts stay frozen.", "freeze backbone")
    freeze_parser.add_argument("what", nargs="*", default=["backbone"], help="backbone | all | none | PREFIX ...")

    @with_argparser(freeze_parser)
    def do_freeze(self, args):
        """Freeze parts of the model."""
        self._report(self.session.freeze(args.what))
        warning = self.session.random_backbone_warning()
        if warning:
            self._cmd.poutput(warning)

    unfreeze_parser = parser("Make parameters trainable again: `all` or module prefixes.", "unfreeze layer4")
    unfreeze_parser.add_argument("what", nargs="*", default=["all"], help="all | PREFIX ...")

    @with_argparser(unfreeze_parser)
    def do_unfreeze(self, args):
        """Unfreeze parts of the model."""
        self._report(self.session.freeze(args.what, unfreeze=True))

    def _report(self, counts):
        trainable, total = counts
        self._cmd.poutput(f"trainable {trainable:,} / {total:,} parameters")
        self._cmd.last_result = {"trainable": trainable, "total": total}
