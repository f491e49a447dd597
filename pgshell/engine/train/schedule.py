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
cosine holds 0 and onecycle its final lr; `schedule_notice` says so before such a run starts. A new phase (a
`train` after `unfreeze`) runs on the same schedule unless `train --restart` moves its start (`schedule_start`)
to now; `phase_notice` says so before such a run starts.

Pure arithmetic: importing this module does not import torch.
"""

from __future__ import annotations

import math
from typing import Callable

from ..config import TrainConfig

# torch's OneCycleLR defaults, which pgshell's onecycle uses
PCT_START, DIV_FACTOR, FINAL_DIV_FACTOR = 0.3, 25.0, 1e4
SPANNING = {"cosine": "cosine", "onecycle": "one-cycle"}  # schedules whose shape is stretched over `epochs`


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer step at which a cosine or one-cycle schedule ends: `epochs` at today's batches per epoch."""
    return max(1, cfg.epochs * max(1, steps_per_epoch))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> tuple[Callable[[int], float], str]:
    """The schedule as a closed-form factor of a counter, and what the counter counts ("epoch" or "step").

    The schedule counts from epoch `schedule_start` (0, or where `train --restart` began a new phase): StepLR
    decays every `step_size` epochs after it, cosine and one-cycle span from it to epoch `epochs`. Before it (an
    older checkpoint's position) the factor is the schedule's first."""
    start = cfg.schedule_start
    if cfg.scheduler == "step":
        return (lambda e: cfg.gamma ** (max(0, e - start) // cfg.step_size)), "epoch"
    if cfg.scheduler not in SPANNING:
        return (lambda _: 1.0), "epoch"
    begin = start * max(1, steps_per_epoch)
    span = max(1, total_steps(cfg, steps_per_epoch) - begin)
    if cfg.scheduler == "cosine":
        f = cosine_factor(span, int(cfg.warmup_epochs * steps_per_epoch))
    else:
        f = onecycle_factor(span)
    return (f if not begin else lambda s: f(max(0, s - begin))), "step"


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
    spans = (f"spans {cfg.epochs} epochs" if not cfg.schedule_start else
             f"spans epochs {cfg.schedule_start + 1} to {cfg.epochs}")
    if end_step > total:
        past = f"{cfg.lr * f(total):.2g}"
        if start_step < total:
            said = f"the {name} schedule {spans}: from epoch {cfg.epochs + 1} this run trains"
        else:
            said = f"the {name} schedule ended at epoch {cfg.epochs}: this run trains"
        said += f" at lr {past}"
        return f"{said} — `set epochs {end_epoch}` to stretch the schedule to the end of this run"
    if end_step < total and end_step % spe == 0:
        return (f"the {name} schedule {spans}; this run stops at epoch {end_epoch} with lr "
                f"{cfg.lr * f(end_step - 1):.2g} — `set epochs {end_epoch}` to end it there")
    return None


def phase_notice(cfg: TrainConfig, steps_per_epoch: int, epoch: int, step: int, changes: list[str]) -> str | None:
    """One line for a run that begins a new phase (`changes`: the freeze/unfreeze commands since the last run) at
    completed epoch `epoch`, optimizer step `step`, while the schedule, counted from `schedule_start`, has brought
    the lr to half its value or less: the new phase would start there, silently (the PyTorch tutorial's fine-tune
    starts again at its lr). `train --restart` restarts the schedule at this epoch."""
    if not changes or cfg.scheduler == "none" or epoch <= cfg.schedule_start:
        return None
    spe = max(1, steps_per_epoch)
    f, unit = lr_factor(cfg, spe)
    g, _ = lr_factor(cfg.replace(schedule_start=epoch), spe)
    at = epoch if unit == "epoch" else step
    now, fresh = cfg.lr * f(at), cfg.lr * g(epoch if unit == "epoch" else epoch * spe)
    if not now <= 0.5 * fresh:
        return None
    name = "StepLR" if cfg.scheduler == "step" else SPANNING[cfg.scheduler]
    since = f"epoch {cfg.schedule_start + 1}"
    return (f"the {name} schedule runs on from {since} across `{'`, `'.join(changes)}`: this new phase starts at lr "
            f"{now:.2g}, not {fresh:.2g} — `train --restart` restarts the schedule at epoch {epoch + 1}")
