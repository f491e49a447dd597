"""Freezing and unfreezing a model's parts: `requires_grad` only (no module swapping), so parameter counts and
state-dict keys never change; `frozen_bn_to_eval` keeps the running statistics of frozen BatchNorm layers fixed, which
`requires_grad` alone does not do. Stages, parameter counts, the warning about a frozen random backbone.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PgError
from .spec import BuiltModel, ModelSpec


# ----------------------------------------------------------------------------------------------------------------
# Freezing


def freeze(built: BuiltModel, what: list[str]) -> None:
    """Stop training parts of the model.

    ["backbone"]: everything but the head (the seed's fixed feature extractor); ["all"]: everything; ["none"]:
    nothing (all trainable); ["head"]: the head; otherwise prefixes: "layer1" freezes "layer1.0.conv1.weight" but
    not "layer10.x". Freezing never unfreezes anything else; a prefix that matches nothing raises PgError and
    changes nothing.
    """
    if [w.lower() for w in what] == ["none"]:
        _set_trainable(built.module, {n for n, _ in built.module.named_parameters()}, True)
        return
    _set_trainable(built.module, _select(built, what, "freeze"), False)


def random_backbone_warning(built: BuiltModel, spec: ModelSpec, trained_steps: int) -> str:
    """A warning when part of the backbone is frozen though it was never pretrained nor trained: a head on random
    features learns little (a try-out reached 55% on 2 classes that way without noticing); "" otherwise."""
    if spec.pretrained or spec.weights or built.source == "file" or trained_steps > 0:
        return ""
    head = set(built.head)
    if all(p.requires_grad for n, p in built.module.named_parameters() if n not in head):
        return ""
    return (f"warning: the frozen backbone of {built.full_name} has random weights (never pretrained or trained): a "
            f"head on random features learns little — `load {spec.name} --pretrained` (or `--weights FILE`), or "
            "`unfreeze all`")


def unfreeze(built: BuiltModel, what: list[str]) -> None:
    """Train parts of the model again: ["all"], ["backbone"], ["head"] or prefixes, matched as in `freeze`."""
    _set_trainable(built.module, _select(built, what, "unfreeze"), True)


def stages(built: BuiltModel) -> list[str]:
    """Top-level names that own parameters, in model order: conv1, bn1, layer1..layer4, fc (ViTs: cls_token, ...)."""
    names: dict[str, None] = {}
    for name, _ in built.module.named_parameters():
        names.setdefault(name.split(".", 1)[0])
    return list(names)


def _select(built: BuiltModel, what: list[str], verb: str) -> set[str]:
    """The parameter names that `what` covers; every word must match something."""
    if not what:
        raise PgError(f"say what to {verb}: backbone, all, head, or stages {', '.join(stages(built))}")
    names = [n for n, _ in built.module.named_parameters()]
    head = set(built.head)
    selected: set[str] = set()
    for word in what:
        if word.lower() == "all":
            selected.update(names)
        elif word.lower() == "backbone":
            selected.update(n for n in names if n not in head)
        elif word.lower() == "head":
            selected.update(head)
        else:
            matched = {n for n in names if n == word or n.startswith(word + ".")}
            if not matched:
                deeper = next((n for n, _ in built.module.named_modules() if n.count(".") == 1), "")
                raise PgError(f"no parameter is named {word!r} or lies under it: {verb} backbone, all, head, or "
                              f"one of the stages {', '.join(stages(built))}"
                              + (f" (or a deeper name like {deeper})" if deeper else ""))
            selected.update(matched)
    return selected


def _set_trainable(module: nn.Module, names: set[str], trainable: bool) -> None:
    for name, p in module.named_parameters():
        if name in names:
            p.requires_grad_(trainable)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def frozen_bn_to_eval(module: nn.Module, every: bool = False) -> None:
    """Put every frozen BatchNorm layer (`every`: every BatchNorm layer) in eval mode; call it right after
    `module.train()`.

    `every` is the `bn_stats frozen` setting (and `auto` on loaded weights): fine-tuning pretrained weights on a small or narrow data set, batch
    statistics can be far from the pretrained running ones (measured on EfficientNet-Lite0 and hand-sign photos:
    cosine 0.24 between a batch's train-mode and eval-mode features), so a head fitted on the frozen features no
    longer fits once the backbone is unfrozen.

    `requires_grad=False` stops the affine weights from learning but a BatchNorm in train mode still updates its
    running mean and variance — a frozen backbone would drift. A BatchNorm is frozen when its own parameters all
    are; one without affine parameters follows its nearest ancestor that has parameters.
    """
    parents: dict[str, nn.Module] = dict(module.named_modules())
    for name, layer in parents.items():
        if not isinstance(layer, _BatchNorm):
            continue
        own = list(layer.parameters(recurse=False))
        if every:
            frozen = True
        elif own:
            frozen = not any(p.requires_grad for p in own)
        else:
            frozen = _ancestor_frozen(parents, name)
        if frozen:
            layer.eval()


def _ancestor_frozen(modules: dict[str, nn.Module], name: str) -> bool:
    while name:
        name = name.rpartition(".")[0]
        params = list(modules[name].parameters())
        if params:
            return not any(p.requires_grad for p in params)
    return False
