"""Learning-rate schedules as closed forms of a counter, each equal to torch's scheduler at every step.

A schedule here is a factor function f(count) and the unit it counts ("epoch" or "step"); the Trainer hands f to
torch's `LambdaLR`, so a group's lr is `initial_lr * f(count)`. Closed forms make the lr a function of the position
alone: resumable anywhere, rebuildable after a freeze change, and a live `set lr` simply rescales it.

What each one equals (tests/test_schedule.py checks every step against torch):
- step:     `StepLR(step_size, gamma)`, counted in epochs.
- cosine:   `SequentialLR([LinearLR(start_factor=1/w, total_iters=w-1), CosineAnnealingLR(T_max=T-w)],
            milestones=[w])` with w warm-up steps and T = epochs x steps_per_epoch: the warm-up rises in equal steps
            (s+1)/w and reaches the peak on its last step, then the cosine falls from the peak over the other T-w.
- onecycle: `OneCycleLR(max_lr=lr, total_steps=T, pct_start=0.3, div_factor=25, final_div_factor=1e4,
            anneal_strategy="cos", three_phase=False)` for the lr (momentum is not cycled).
Past the span (a run longer than `epochs`), where torch's OneCycleLR raises and CosineAnnealingLR climbs back up,
cosine holds 0 and onecycle its final lr; `schedule_notice` says so before such a run starts.

Pure arithmetic: importing this module does not import torch.
"""

from __future__ import annotations

import math
from typing import Callable

from .config import TrainConfig

# torch's OneCycleLR defaults, which pgshell's onecycle uses
PCT_START, DIV_FACTOR, FINAL_DIV_FACTOR = 0.3, 25.0, 1e4
SPANNING = {"cosine": "cosine", "onecycle": "one-cycle"}  # schedules whose shape is stretched over `epochs`


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps a cosine or one-cycle schedule spans: `epochs` at today's batches per epoch."""
    return max(1, cfg.epochs * max(1, steps_per_epoch))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> tuple[Callable[[int], float], str]:
    """The schedule as a closed-form factor of a counter, and what the counter counts ("epoch" or "step")."""
    total = total_steps(cfg, steps_per_epoch)
    if cfg.scheduler == "step":
        return (lambda e: cfg.gamma ** (e // cfg.step_size)), "epoch"
    if cfg.scheduler == "cosine":
        return cosine_factor(total, int(cfg.warmup_epochs * steps_per_epoch)), "step"
    if cfg.scheduler == "onecycle":
        return onecycle_factor(total), "step"
    return (lambda _: 1.0), "epoch"


def cosine_factor(total: int, warm: int) -> Callable[[int], float]:
    """Linear warm-up over `warm` steps to the peak, then cosine annealing to 0 at step `total` and after."""

    def cosine(s: int) -> float:
        if s >= total:  # the value torch's cosine has at T_max, held rather than climbing back up
            return 0.0
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (s - warm) / (total - warm)))

    return cosine


def onecycle_factor(total: int) -> Callable[[int], float]:
    """torch's OneCycleLR (two phases, cosine annealing) as a factor of max_lr, step s = 0 .. total-1.

    As in torch, the first phase ends at the float step `pct_start * total - 1` (so for 30 steps the peak is step 8)
    and the last step, total-1, reaches initial_lr / final_div_factor; later steps keep that value.
    """
    start, low = 1.0 / DIV_FACTOR, 1.0 / DIV_FACTOR / FINAL_DIV_FACTOR
    up_end, down_end = float(PCT_START * total) - 1, total - 1

    def anneal(a: float, b: float, pct: float) -> float:  # torch's _annealing_cos
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    def onecycle(s: int) -> float:
        s = min(s, down_end)
        if s <= up_end:
            return anneal(start, 1.0, s / up_end)
        return anneal(1.0, low, (s - up_end) / (down_end - up_end))

    return onecycle


def schedule_notice(cfg: TrainConfig, steps_per_epoch: int, start_step: int, end_step: int) -> str | None:
    """One line for a run from optimizer step `start_step` to `end_step` that leaves a cosine/one-cycle span, or None.

    Said when training starts, because the span (`epochs`) is easy to miss: `train 8` with the default 25 epochs
    stops with the lr still high, and training past the span runs at lr 0 (one-cycle: its final lr). A run that stops
    mid-epoch before the span's end (`train --steps N`, a probe) gets no notice. Epochs are counted at today's batches
    per epoch, as the schedule counts them.
    """
    name = SPANNING.get(cfg.scheduler)
    if name is None or end_step <= start_step:
        return None
    spe, total = max(1, steps_per_epoch), total_steps(cfg, steps_per_epoch)
    f, _ = lr_factor(cfg, spe)
    end_epoch = math.ceil(end_step / spe)
    if end_step > total:
        past = f"{cfg.lr * f(total):.2g}"
        if start_step < total:
            said = f"the {name} schedule spans {cfg.epochs} epochs: from epoch {cfg.epochs + 1} this run trains"
        else:
            said = f"the {name} schedule ended at epoch {cfg.epochs}: this run trains"
        said += f" at lr {past}"
        return f"{said} — `set epochs {end_epoch}` to stretch the schedule to the end of this run"
    if end_step < total and end_step % spe == 0:
        return (f"the {name} schedule spans {cfg.epochs} epochs; this run stops at epoch {end_epoch} with lr "
                f"{cfg.lr * f(end_step - 1):.2g} — `set epochs {end_epoch}` to end it there")
    return None
