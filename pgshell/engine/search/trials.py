"""Hyperparameter search with Optuna: the sampler and pruner, the study's storage, and one trial's training
through the one training loop (`Trainer.run`), pruned by a handler. The space is space.py's. Importing this module
imports neither torch nor optuna.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from typing import Any

from ..errors import PgError
from ..train.events import Handler


METRICS = {"val_accuracy": ("accuracy", "maximize"), "val_loss": ("loss", "minimize")}
PRUNERS = ("median", "halving", "none")


def check_storage(url: str | None) -> None:
    """A study's storage must outlive the process and be shared by every trial's connection: SQLite in memory
    (`sqlite://`, `sqlite:///`, `sqlite:///:memory:`) is neither, and would fail inside Optuna far from the cause."""
    if not url:
        return
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise PgError(f"--storage {url[:80]!r} is not a storage URL: e.g. sqlite:///study.db or "
                      "postgresql://user@host/db (or leave --storage out for sessions/NAME/tune.db)")
    if scheme.split("+")[0].lower() == "sqlite":
        database = (rest[1:] if rest.startswith("/") else rest).split("?")[0]
        if database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in rest:
            raise PgError(f"--storage {url[:80]} is an in-memory SQLite database, gone when the process ends: name "
                          "a file (sqlite:///study.db) or leave --storage out for sessions/NAME/tune.db")


def make_sampler(seed: int, n_existing: int, worker: str | None = None):
    """TPE seeded from the session's seed and the study's size: a study resumed in a new process does not replay
    the random start-up draws of its first run. TPE models the results after 5 trials (Optuna's default is 10;
    searches here are tens of trials, not hundreds).

    `worker` names one of several machines sharing a study (a shared --storage): its hash joins the seed, else
    machines started with the same seed on the same study would draw the same parameters; and TPE's constant liar
    (Optuna's advice for parallel workers, its default only from Optuna 5) counts the trials other machines are
    running as poor results, so a machine does not sample right next to them."""
    import optuna

    mixed = seed * 100_003 + n_existing
    if worker is None:
        return optuna.samplers.TPESampler(seed=mixed % 2**32, n_startup_trials=5)
    return optuna.samplers.TPESampler(seed=(mixed + zlib.crc32(worker.encode())) % 2**32, n_startup_trials=5,
                                      constant_liar=True)


def make_pruner(name: str):
    """median: prune a trial whose best validation metric so far is worse than the median of the completed trials
    at the same epoch, once 2 trials have completed. halving: successive halving (rungs at epochs 1, 3, 9, ...)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise PgError(f"--pruner is one of {', '.join(PRUNERS)}, not {name!r}")


# ---------------------------------------------------------------- one trial
def trial_trainer(init, spec, splits, cfg, params: dict[str, Any], size: int, log, label: str,
                  epochs: int | None, steps: int | None):
    """A Trainer for one trial: a deep copy of the initial model, the session's settings with the trial's
    parameters, a fresh optimizer, position 0 (so every trial sees the same data in the same order)."""
    from ..models.freezing import freeze
    from ..train.recipes import optimizer_steps_per_epoch
    from ..train.loop import Trainer

    settings = {k: v for k, v in params.items() if k != "freeze"}
    cfg = cfg.replace(**settings, log_every=0)
    batches = max(1, math.ceil(len(splits.train) / cfg.batch_size))
    span = epochs or max(1, math.ceil((steps or 1) / optimizer_steps_per_epoch(batches, cfg.accumulate)))
    cfg = cfg.replace(epochs=span, schedule_start=0)  # cosine/onecycle schedules span the trial (from its 0)
    built = dataclasses.replace(init, module=copy.deepcopy(init.module))
    if "freeze" in params:
        freeze(built, ["none"])
        if params["freeze"] == "backbone":
            freeze(built, ["backbone"])
    return Trainer(built, spec, splits, cfg, log=log, trial=label, size=size)


class TrialRun:
    """One trial's training: `epochs` epochs (the validation metric is reported to the pruner after each; a pruned
    trial stops at once) or `steps` optimizer steps (batches unless `accumulate` > 1; one validation at the end). A run can pause and be resumed by calling
    `run` again. A non-finite training loss or metric stops the trial as pruned ("diverged")."""

    def __init__(self, trial, trainer, metric: str, epochs: int | None = None, steps: int | None = None):
        if (epochs is None) == (steps is None):
            raise PgError("a trial trains for epochs or for steps")
        self.trial, self.trainer, self.metric = trial, trainer, metric
        self.epochs, self.steps = epochs, steps
        self.value: float | None = None
        self.reason = ""  # why it was pruned: "pruned" | "diverged"
        self.curve: dict[int, float] = {}  # reported step -> metric

    def value_of(self, val: dict) -> float:
        """The compared metric of a validation result."""
        return float(val[METRICS[self.metric][0]])

    def run(self, handlers: list | tuple = ()) -> str:
        """Returns "complete" (self.value set), "pruned", "paused" or "stopped". `handlers` are the caller's own."""
        tr = self.trainer
        cbs = [_Pruning(self), *handlers]
        if self.epochs is not None and tr.pos.epoch < self.epochs and not self.reason:
            res = tr.run(epochs=self.epochs - tr.pos.epoch, handlers=cbs)
        elif self.steps is not None and tr.pos.step < self.steps and not self.reason:
            res = tr.run(steps=self.steps - tr.pos.step, handlers=cbs)
        else:
            res = None
        if self.reason:
            return "pruned"
        if res is not None and res.outcome in ("paused", "stopped"):
            return res.outcome
        if self.steps is not None:
            v = self.value_of(tr.evaluate("val"))
            self.curve[self.steps] = v
            self.trial.report(v, self.steps)
        else:
            v = self.curve.get(self.epochs, math.nan)
        if not math.isfinite(v):
            self.reason = "diverged"
            return "pruned"
        self.value = v
        return "complete"


class _Pruning(Handler):
    """A trial's pruning as a loop handler: a non-finite loss, or the pruner's verdict on the validation metric
    after an epoch, stops the trial."""

    order = 60

    def __init__(self, run: TrialRun):
        self.run = run

    def before_batch(self, tr, ctx) -> None:
        if self.run.reason:
            tr.request("stop", self.run.reason)

    def after_batch(self, tr, ctx) -> None:
        if ctx.row["images"] and not math.isfinite(ctx.row["loss"]):
            self.run.reason = "diverged"
            tr.request("stop", "diverged")

    def after_epoch(self, tr, ctx) -> None:
        run, info = self.run, ctx.info
        if run.steps is not None or info["val"] is None:
            return
        v = run.value_of(info["val"])
        run.curve[info["epoch"]] = v
        run.trial.report(v, info["epoch"])
        if not math.isfinite(v):
            run.reason = "diverged"
        elif info["epoch"] < run.epochs and run.trial.should_prune():  # the last epoch completes the trial
            run.reason = "pruned"
        if run.reason:
            tr.request("stop", run.reason)


# ---------------------------------------------------------------- the study's initial weights
def save_initial(path, built) -> None:
    """The weights (and which parameters are frozen) every trial of a study starts from, as a pgshell checkpoint."""
    from ..store.checkpoint import save_checkpoint

    module = built.module
    save_checkpoint(path, {"model": dict(module.state_dict()),
                           "frozen": [n for n, p in module.named_parameters() if not p.requires_grad]},
                    {"kind": "tune-initial"})


def load_initial(path, built):
    """A copy of `built` holding the study's initial weights; PgError if they do not fit this model."""
    from ..models.weights import restore_weights
    from ..store.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    twin = dataclasses.replace(built, module=copy.deepcopy(built.module))
    try:
        restore_weights(twin.module, state["model"], state.get("frozen", []))
    except PgError:
        raise PgError(f"this study's trials start from weights ({path}) that do not fit the current model: load the "
                      "model the study began with, or start another study with --study NAME") from None
    return twin
