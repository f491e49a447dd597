"""The optimizer: pgshell's parameter groups handed to timm's optimizer factory (`timm.optim.create_optimizer_v2`),
so every optimizer timm registers can train a session (`set optimizer lamb`).

The groups are pgshell's own, not the factory's: by role (head, backbone: `backbone_lr_scale`), by layer under
`layer_decay` < 1 (timm's layer-decay grouping, engine.recipes.layer_scales) and, with weight decay, without decay
for norm and bias parameters (timm's `param_groups_weight_decay`, engine.recipes.no_weight_decay). Each group keeps
the names of its parameters (checkpoints hold the optimizer state by name) and its role and scales (`show`, live
changes of lr and backbone_lr_scale). The factory gets them as a list of groups, so it adds none of its own.
"""

from __future__ import annotations

import inspect

import torch

from . import recipes as R
from .timm_optimizers import optimizer_names
from ..config import TrainConfig
from ..errors import PgError

def param_groups(module: torch.nn.Module, head: set[str], cfg: TrainConfig) -> list[dict]:
    """Parameter groups by role, head and backbone, so their learning rates can differ (discriminative fine-tuning),
    and with `layer_decay` < 1 by layer too. A group's lr is lr x lr_scale, lr_scale = layer_scale x (1 for the
    head, backbone_lr_scale for the backbone). The head's group comes first: its lr is the one logged. With weight
    decay, norm and bias parameters get none, as in timm: each role then has a group with `decay` False beside it."""
    scales = R.layer_scales(module, head, cfg.layer_decay) if cfg.layer_decay < 1 else {}
    exempt = R.no_weight_decay(module) if cfg.weight_decay > 0 else None
    found: dict[tuple[bool, float, bool | None], dict] = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            key = (n not in head, scales.get(n, 1.0), None if exempt is None else n not in exempt)
            g = found.setdefault(key, {"params": [], "names": [], "role": "backbone" if key[0] else "head",
                                       "layer_scale": key[1], "decay": key[2]})
            g["params"].append(p)
            g["names"].append(n)
    groups = [found[k] for k in sorted(found, key=lambda k: (k[0], -k[1], k[2] is False))]
    for g in groups:
        scale = g["layer_scale"] * (1.0 if g["role"] == "head" else cfg.backbone_lr_scale)
        g.update(lr=cfg.lr * scale, initial_lr=cfg.lr * scale, lr_scale=scale,
                 weight_decay=0.0 if g["decay"] is False else cfg.weight_decay)
    return groups


def build_optimizer(module: torch.nn.Module, head: set[str], cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """The optimizer `cfg.optimizer` names, from timm's factory, over `param_groups` (None: nothing trainable)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(module, head, cfg)
    if not groups:
        return None
    try:
        return create_optimizer_v2(groups, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **_momentum_args(cfg))
    except (ValueError, TypeError, ImportError, AssertionError) as e:  # e.g. `nesterov` with momentum 0
        raise PgError(f"optimizer {cfg.optimizer} cannot be built with these settings: {e}") from None


def _momentum_args(cfg: TrainConfig) -> dict:
    """What `momentum` and `nesterov` mean beyond timm's own momentum argument. `sgd` is pgshell's: Nesterov only
    with `set nesterov on` (timm's `sgd` defaults to Nesterov; its `nesterov` and `momentum` names stay as timm has
    them). For optimizers with betas, momentum is beta1 and the other betas are the optimizer's own defaults, so
    Adam and AdamW get (momentum, 0.999) as before."""
    from timm.optim._optim_factory import default_registry

    if cfg.optimizer not in optimizer_names():
        raise PgError(f"optimizer must be one of {', '.join(optimizer_names())}, not {cfg.optimizer!r}")
    info = default_registry.get_optimizer_info(cfg.optimizer)
    if cfg.optimizer == "sgd":
        return {"nesterov": cfg.nesterov and cfg.momentum > 0}
    if info.has_betas:
        betas = (info.defaults or {}).get("betas") or inspect.signature(info.opt_class).parameters["betas"].default
        if betas is not None:  # None: Adafactor without a first moment, as timm has it
            return {"betas": (cfg.momentum, *tuple(betas)[1:])}
    return {}


def set_momentum(group: dict, value: float) -> None:
    """A live `set momentum` on one parameter group: beta1 where the optimizer has betas (Adafactor: `beta1`),
    `momentum` where it has that; optimizers with neither, or without a first moment, are left as they are."""
    if group.get("betas") is not None:
        group["betas"] = (value, *group["betas"][1:])
    elif group.get("beta1") is not None:
        group["beta1"] = value
    elif "momentum" in group:
        group["momentum"] = value


# ---------------------------------------------------------------- the optimizer's state by parameter name
# A group's entries that are pgshell's (they are rebuilt from the settings), not the optimizer's counters.
_OURS = frozenset({"params", "names", "role", "layer_scale", "decay", "lr", "initial_lr", "lr_scale", "weight_decay"})


def state_by_name(optimizer: torch.optim.Optimizer, kind: str, kept: dict | None = None) -> dict:
    """The optimizer's state keyed by parameter name (what checkpoints hold; groups change with freeze/unfreeze):
    `state` per parameter and, for optimizers that count in their groups rather than per parameter (timm's Lamb
    and Adan keep `step` there), `groups`: those entries with the names of the group's parameters. `kept`: an
    earlier state of the same optimizer whose parameters not in this one (frozen now) are kept."""
    sd = optimizer.state_dict()
    names = {i: n for g in sd["param_groups"] for i, n in zip(g["params"], g["names"])}
    state = dict((kept or {}).get("state", {}))
    state.update({names[i]: s for i, s in sd["state"].items()})
    out = {"type": kind, "state": state}
    groups = [{"names": list(g["names"]), "values": values} for g in sd["param_groups"]
              if (values := {k: v for k, v in g.items() if k not in _OURS and k not in optimizer.defaults})]
    if groups:  # torch's SGD, Adam and AdamW have none: their checkpoints are as they were
        current = {n for g in groups for n in g["names"]}
        out["groups"] = [g for g in (kept or {}).get("groups", []) if not current & set(g["names"])] + groups
    return out


def load_state_by_name(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Give the optimizer the state `state_by_name` saved, for the parameters it has; a group takes the counters of
    the first of its parameters that had some."""
    sd = optimizer.state_dict()
    index = {n: i for g in sd["param_groups"] for i, n in zip(g["params"], g["names"])}
    sd["state"] = {index[n]: s for n, s in saved["state"].items() if n in index}
    counters = {n: g["values"] for g in saved.get("groups", []) for n in g["names"]}
    for g in sd["param_groups"]:
        found = next((counters[n] for n in g["names"] if n in counters), None)
        if found:
            g.update(found)
    optimizer.load_state_dict(sd)
