"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2015; fastai's `lr_find`): train a copy of the
model for a few batches while the learning rate grows exponentially from `start` to `end`, record the smoothed loss,
stop when it diverges, and suggest a learning rate from the curve.

The batches go through the one training loop (`Trainer.run`): the `RangeTestSchedule` handler sets each batch's
learning rate with `apply_live("lr", ...)`, records its loss, and asks the loop to stop once the curve has diverged. The trainer it
drives is built here from *copies* of the model and the optimizer state, so the session's run is left untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from ..errors import PgError
from .events import Handler

BETA = 0.98  # fastai's smoothing of the loss: a debiased exponential moving average
DIVERGE = 4.0  # stop once the smoothed loss exceeds 4x the best smoothed loss so far (fastai's stop_div)


class RangeTest:
    """The bookkeeping of one range test: which lr the next batch gets, the curve so far, when to stop.

    Pure arithmetic (no torch), so the suggestion logic is tested on its own and the state survives a pause.
    """

    def __init__(self, start: float = 1e-7, end: float = 10.0, steps: int = 100):
        if not (start > 0 and end > start):
            raise PgError(f"lrfind needs 0 < --start < --end, not start {start:g} and end {end:g}")
        if steps < 10:
            raise PgError(f"lrfind needs at least 10 --steps to draw a curve, not {steps}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)
        self.lrs: list[float] = []
        self.losses: list[float] = []  # raw batch losses
        self.smoothed: list[float] = []
        self._avg = 0.0
        self.best = math.inf
        self.stop_reason = ""  # "" while running, then "end" or "diverged"

    def lr(self, i: int) -> float:
        """Exponential schedule: lr(0) = start, lr(steps - 1) = end."""
        return self.start * (self.end / self.start) ** (i / (self.steps - 1))

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def next_lr(self) -> float | None:
        """The learning rate of the next batch, or None when the test is over."""
        if not self.stop_reason and len(self.lrs) >= self.steps:
            self.stop_reason = "end"
        return None if self.stop_reason else self.lr(len(self.lrs))

    def record(self, lr: float, loss: float) -> None:
        self.lrs.append(float(lr))
        self.losses.append(float(loss))
        if not math.isfinite(loss):
            self.smoothed.append(math.inf)
            self.stop_reason = "diverged"
            return
        self._avg = BETA * self._avg + (1 - BETA) * loss
        smooth = self._avg / (1 - BETA ** len(self.lrs))
        self.smoothed.append(smooth)
        self.best = min(self.best, smooth)
        if smooth > DIVERGE * self.best:
            self.stop_reason = "diverged"

    def result(self) -> dict[str, Any]:
        """The curve and the suggestions, as plain data (JSON-able)."""
        out = {"start": self.start, "end": self.end, "steps": self.steps, "stop": self.stop_reason or "end",
               "lrs": list(self.lrs), "losses": list(self.losses), "smoothed": list(self.smoothed)}
        out.update(suggest(self.lrs, self.smoothed))
        return out


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """fastai's suggestions, read on the descending part of the smoothed curve only: after its first tenth (flat and
    noisy) and up to its lowest point (what follows climbs towards divergence, so no suggestion may lie there):

    - steepest: where the loss falls fastest per unit of log(lr);
    - valley: fastai's default, from the longest stretch where the loss keeps decreasing, 1/2 of the way down it;
    - minimum: a tenth of the lr at the lowest loss (the classic rule of thumb; shown as "minimum/10").
    """
    pts = [(lr, v) for lr, v in zip(lrs, smoothed) if math.isfinite(v)]
    lo = len(pts) // 10
    if len(pts) - 5 - lo < 5:  # as fastai: too few points past the noisy start to read anything
        raise PgError(f"the loss diverged after {len(lrs)} batches, too soon to read a curve: "
                      "lower --end, or give more --steps")
    tail = [v for _, v in pts[lo:]]
    pts = pts[lo: lo + tail.index(min(tail)) + 1]
    if len(pts) < 3:
        raise PgError(f"the smoothed loss never fell: it was lowest at lr {pts[-1][0]:.2e}, the start of the range "
                      "read — lower --start, or give more --steps")
    x = [math.log(lr) for lr, _ in pts]
    y = [v for _, v in pts]
    grads = [(y[i + 1] - y[i]) / (x[i + 1] - x[i]) for i in range(len(y) - 1)]
    steepest = pts[min(range(len(grads)), key=grads.__getitem__)][0]
    # longest decreasing subsequence ending at each point (fastai's `valley`)
    m = len(y)
    run = [1] * m
    best_end = 0
    for i in range(1, m):
        for j in range(i):
            if y[i] < y[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end = i
    best_start = best_end - run[best_end] + 1
    third = (best_end - best_start) / 3
    valley = pts[best_start + int(third) + int(third / 2)][0]
    minimum = pts[-1][0] / 10
    return {"steepest": steepest, "valley": valley, "minimum": minimum}


LABELS = {"valley": "valley", "steepest": "steepest descent", "minimum": "minimum/10"}  # what each suggestion is


def range_test_trainer(built, spec, splits, cfg, size: int = 0, optimizer_state: dict | None = None):
    """A Trainer on deep copies of the model and (by parameter name) the optimizer state, with no schedule, no
    metrics log and no validation split: the session's model, optimizer and position stay exactly as they are."""
    from .loop import Trainer

    twin = dataclasses.replace(built, module=copy.deepcopy(built.module))
    data = dataclasses.replace(splits, val=[], test=None)  # no validation passes at epoch ends: only the curve counts
    # one optimizer step per batch and per lr, no averaged weights, no early stop: the curve is of the batches
    tr = Trainer(twin, spec, data, cfg.replace(scheduler="none", log_every=0, accumulate=1, ema=0.0, patience=0),
                 log=None, size=size)
    if optimizer_state and optimizer_state.get("type") == cfg.optimizer:
        tr.load_optimizer_state(copy.deepcopy(optimizer_state))  # carried over by parameter name
    return tr


class RangeTestSchedule(Handler):
    """The range test as a loop handler: each batch's lr from the test, each batch's loss into it, a stop request
    once the curve has diverged or every step ran."""

    order = 15  # before the progress report, so it counts this batch

    def __init__(self, test: RangeTest):
        self.test = test

    def before_batch(self, tr, ctx) -> None:
        if tr.requested:
            return
        lr = self.test.next_lr()
        if lr is None:
            tr.request("stop", "the range test is complete")
        else:
            tr.apply_live("lr", lr)

    def after_batch(self, tr, ctx) -> None:
        if ctx.row["images"]:  # a batch of nothing but bad images taught nothing: its lr is tried again
            self.test.record(self.test.lr(len(self.test.lrs)), ctx.row["loss"])


def run_range_test(trainer, test: RangeTest, handlers: list | tuple = ()) -> str:
    """Drive `trainer` through the rest of `test`; returns "done", "paused" or "stopped" (a pause can be resumed by
    calling this again). `handlers` are the caller's own (pause/stop, progress)."""
    left = test.steps - len(test.lrs)
    if left > 0 and not test.done:
        res = trainer.run(steps=left, handlers=[RangeTestSchedule(test), *handlers])
        if res.outcome == "paused" or (res.outcome == "stopped" and not test.done):
            return res.outcome
    test.next_lr()  # marks the end when every step ran
    return "done"
