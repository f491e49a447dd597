"""Model soups: the average of the weights of several checkpoints of one run (Wortsman et al. 2022, "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing inference time").

Pure functions on state dicts, plus the BatchNorm statistics pass an averaged model needs:

- `average_weights`: the uniform soup. Floating-point tensors are summed in float64 and divided once, then cast back,
  so the mean of float32 weights is the correctly rounded one whatever the number of ingredients; other tensors (a
  BatchNorm's `num_batches_tracked`) are taken from the first state.
- `rank` and `greedy_soup`: the paper's greedy soup (its Recipe 1): ingredients sorted by held-out accuracy, best
  first; the soup starts as the best one, and each next ingredient stays in only if the soup's held-out accuracy does
  not drop (>=) with it. The scoring is a function the caller gives (an evaluation pass), so the order and the
  rejections are testable with any numbers.
- `differing_batchnorm` and `recompute_batchnorm`: a BatchNorm layer's running mean and variance are not a function
  of its weights; the average of the ingredients' statistics is not the statistics of the averaged network. Where the
  ingredients' statistics differ (a frozen backbone's do not: those stay exact), they are recomputed the way
  `torch.optim.swa_utils.update_bn` does for SWA: reset, momentum None (a cumulative average over the batches), one
  forward pass over training images without gradients. Unlike update_bn only those layers are in train mode: the
  rest of the network stays in eval mode, so dropout and drop-path do not disturb the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PgError


def check_ingredients(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Refuse states that are not the same network: the same tensor names, shapes and dtypes (one architecture, one
    head). `names` label the states in the message."""
    if len(states) < 1:
        raise PgError("a soup needs at least one checkpoint")
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            only = sorted(set(state) ^ set(first))[:2]
            raise PgError(f"{name} and {names[0]} are not the same network (tensors only in one: "
                          f"{', '.join(only)}): a soup averages checkpoints of one architecture and head")
        for key, t in state.items():
            if t.shape != first[key].shape or t.dtype != first[key].dtype:
                raise PgError(f"{name} and {names[0]} differ at {key} ({tuple(t.shape)} vs "
                              f"{tuple(first[key].shape)}): a soup averages checkpoints of one architecture and head")


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup of `states` (same keys and shapes): floating-point tensors averaged (in float64, cast back to
    their dtype), the others taken from the first state."""
    out = {}
    for key, t in states[0].items():
        if t.is_floating_point():
            total = torch.zeros(t.shape, dtype=torch.float64)
            for state in states:
                total += state[key].to(torch.float64)
            out[key] = (total / len(states)).to(t.dtype)
        else:
            out[key] = t.clone()
    return out


def rank(values: Sequence[float]) -> list[int]:
    """Indices of `values` from the highest to the lowest (ties: the earlier first) — the greedy soup's order."""
    return sorted(range(len(values)), key=lambda i: -values[i])


@dataclass
class GreedyStep:
    index: int  # the ingredient tried
    score: float  # the held-out score of the soup with it
    kept: bool  # whether it stayed in (the score did not drop)


def greedy_soup(order: Sequence[int], score: Callable[[list[int]], float],
                stop: Callable[[], bool] = lambda: False) -> tuple[list[int], list[GreedyStep]]:
    """Wortsman et al.'s greedy soup over the ingredients in `order` (best first): `score(indices)` is the held-out
    accuracy of the uniform soup of those ingredients. `stop()` true ends the search early (a time budget): the soup
    is then the greedy soup of the ingredients tried so far. Returns (the ingredients kept, in the order tried; every
    step)."""
    if not order:
        raise PgError("a soup needs at least one checkpoint")
    chosen = [order[0]]
    best = score(chosen)
    steps = [GreedyStep(order[0], best, True)]
    for i in order[1:]:
        if stop():
            break
        value = score(chosen + [i])
        kept = value >= best
        if kept:
            chosen.append(i)
            best = value
        steps.append(GreedyStep(i, value, kept))
    return chosen, steps


def batchnorm_layers(module: torch.nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers that keep running statistics (timm's BatchNormAct2d is one), by module name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def differing_batchnorm(module: torch.nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> list[str]:
    """The BatchNorm layers of `module` whose running mean or variance is not the same in every state: the ones an
    average of those states must recompute."""
    out = []
    for name in batchnorm_layers(module):
        prefix = f"{name}." if name else ""
        for stat in ("running_mean", "running_var"):
            key = prefix + stat
            if key in states[0] and any(not torch.equal(s[key], states[0][key]) for s in states[1:]):
                out.append(name)
                break
    return out


@torch.no_grad()
def recompute_batchnorm(module: torch.nn.Module, inputs: Iterable[torch.Tensor], names: Sequence[str],
                        forward: Callable[[torch.Tensor], object] | None = None) -> int:
    """Recompute the running statistics of the BatchNorm layers `names` of `module` from `inputs` (batches already
    transformed and on the module's device): reset, momentum None (the running mean and variance become the plain
    average of the batches' means and unbiased variances), those layers in train mode and everything else in eval
    mode, no gradients. Every module's mode and every momentum is restored afterwards. Batches of one image are
    skipped (a BatchNorm of one value per channel has no variance). Returns the number of images used."""
    layers = batchnorm_layers(module)
    chosen = {n: layers[n] for n in names if n in layers}
    if not chosen:
        return 0
    modes = [(m, m.training) for m in module.modules()]
    momenta = {n: m.momentum for n, m in chosen.items()}
    forward = forward or module
    seen = 0
    try:
        module.eval()
        for m in chosen.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in inputs:
            if len(x) < 2:
                continue
            forward(x)
            seen += len(x)
    finally:
        for n, m in chosen.items():
            m.momentum = momenta[n]
        for m, training in modes:
            m.training = training
    if not seen:
        raise PgError("no training batch of 2 or more images to recompute the BatchNorm statistics of the soup")
    return seen
