"""Hyperparameter search with Optuna: the search space (its default and the `--space` syntax), the sampler and
pruner, and one trial's training through the one training loop (`Trainer.run`).

The space is plain data (`Dim`s) parsed from text such as `lr=1e-5:1e-1:log optimizer=sgd,adamw batch_size=16,32
label_smoothing=0:0.2 freeze=none`: `LOW:HIGH[:log]` is a range, `A,B,...` a choice, a single value is fixed (every
trial uses it), `NAME=-` leaves NAME out (trials keep the session's own setting). Entries override the default space
of the same name and add new names. Importing this module imports neither torch nor optuna.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any

from ..config import SETTINGS, parse_value
from ..errors import PgError
from ..train.events import Handler

# Settings a search may vary; `freeze` is the model's trainable part (backbone: only the head trains; none: all).
SEARCHABLE = ("lr", "weight_decay", "optimizer", "batch_size", "freeze", "label_smoothing", "momentum", "nesterov",
              "backbone_lr_scale", "scheduler", "step_size", "gamma", "warmup_epochs", "criterion", "augment",
              # the augmentation policy and the recipes (engine/recipes.py)
              "crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter", "auto_augment", "random_erasing",
              "crop_pct", "ema", "mixup", "cutmix", "mix_prob", "layer_decay", "accumulate", "clip_grad",
              "class_weights", "sampler", "tta")
FREEZE_CHOICES = ("backbone", "none")
METRICS = {"val_accuracy": ("accuracy", "maximize"), "val_loss": ("loss", "minimize")}
PRUNERS = ("median", "halving", "none")
SPACE_HELP = "NAME=LOW:HIGH[:log] | NAME=A,B,... | NAME=VALUE | NAME=- (e.g. lr=1e-4:1e-1:log optimizer=sgd,adamw)"


@dataclass(frozen=True)
class Dim:
    """One searched (or fixed) setting."""

    name: str
    kind: str  # "range" | "choice" | "fixed"
    low: Any = None
    high: Any = None
    log: bool = False
    choices: tuple = ()
    value: Any = None

    @property
    def integer(self) -> bool:
        return self.kind == "range" and isinstance(self.low, int) and not isinstance(self.low, bool)

    def text(self) -> str:
        if self.kind == "range":
            return f"{self.name}={_fmt(self.low)}:{_fmt(self.high)}" + (":log" if self.log else "")
        if self.kind == "choice":
            return f"{self.name}=" + ",".join(_fmt(c) for c in self.choices)
        return f"{self.name}={_fmt(self.value)}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def default_space(n_train: int) -> dict[str, Dim]:
    """The default search: wide log ranges for the rates, both optimizer families, batch sizes the data can fill,
    a frozen or a trainable backbone, some label smoothing."""
    sizes = tuple(b for b in (16, 32, 64) if b <= n_train) or (max(1, n_train),)
    dims = [Dim("lr", "range", 1e-5, 1e-1, log=True), Dim("weight_decay", "range", 1e-6, 1e-2, log=True),
            Dim("optimizer", "choice", choices=("sgd", "adamw")),
            Dim("batch_size", "choice", choices=sizes) if len(sizes) > 1 else Dim("batch_size", "fixed", value=sizes[0]),
            Dim("freeze", "choice", choices=FREEZE_CHOICES), Dim("label_smoothing", "range", 0.0, 0.2)]
    return {d.name: d for d in dims}


def parse_space(text: str | None, n_train: int) -> dict[str, Dim]:
    """The default space with `text`'s entries applied; a mistake is one PgError naming the entry."""
    space = default_space(n_train)
    for token in (text or "").split():
        name, eq, value = token.partition("=")
        name = name.strip().lower()
        if not eq or not name or not value:
            raise PgError(f"--space entries look like {SPACE_HELP}; not {token!r}")
        if name not in SEARCHABLE:
            raise PgError(f"--space {token!r}: cannot search {name}; searchable are {', '.join(SEARCHABLE)}")
        if value == "-":
            space.pop(name, None)
            continue
        space[name] = _parse_dim(name, value, token)
    return space


def _parse_dim(name: str, value: str, token: str) -> Dim:
    kind = str if name == "freeze" else type(SETTINGS[name].default)
    if ":" in value:
        parts = value.split(":")
        log = len(parts) == 3 and parts[2].lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise PgError(f"--space {token!r}: a range is LOW:HIGH or LOW:HIGH:log")
        if kind not in (int, float):
            raise PgError(f"--space {token!r}: {name} takes choices ({name}=A,B), not a range")
        low, high = (_check(name, p, token) for p in parts[:2])
        if low > high:
            raise PgError(f"--space {token!r}: the range's low end is above its high end")
        if log and low <= 0:
            raise PgError(f"--space {token!r}: a log range must start above 0")
        if low == high:
            return Dim(name, "fixed", value=low)
        return Dim(name, "range", low, high, log=log)
    values = []
    for part in value.split(","):
        v = _check(name, part, token)
        if v not in values:
            values.append(v)
    if len(values) == 1:
        return Dim(name, "fixed", value=values[0])
    return Dim(name, "choice", choices=tuple(values))


def _check(name: str, text: str, token: str) -> Any:
    if name == "freeze":
        if text.strip().lower() not in FREEZE_CHOICES:
            raise PgError(f"--space {token!r}: freeze is one of {', '.join(FREEZE_CHOICES)}")
        return text.strip().lower()
    try:
        return parse_value(name, text)
    except PgError as e:
        raise PgError(f"--space {token!r}: {e}") from None


def format_space(space: dict[str, Dim]) -> str:
    """The space as `--space` text; parse_space(format_space(x)) == x (default names left out show as NAME=-)."""
    dropped = [f"{name}=-" for name in default_space(1) if name not in space]
    return " ".join([d.text() for d in space.values()] + dropped)


# ---------------------------------------------------------------- optuna
def distribution(dim: Dim):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dim.kind == "choice":
        return CategoricalDistribution(dim.choices)
    if dim.integer:
        return IntDistribution(dim.low, dim.high, log=dim.log)
    return FloatDistribution(dim.low, dim.high, log=dim.log)


def check_compatible(space: dict[str, Dim], trials) -> None:
    """A study keeps each parameter's kind (range or choice), log scale and choices (Optuna's rule); say so in one
    line before any trial starts rather than failing in the middle of one."""
    from optuna.distributions import check_distribution_compatibility

    seen: dict[str, Any] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            seen.setdefault(name, dist)
    for dim in space.values():
        if dim.kind == "fixed" or dim.name not in seen:
            continue
        try:
            check_distribution_compatibility(seen[dim.name], distribution(dim))
        except ValueError:
            raise PgError(f"this study searched {dim.name} as {_describe(dim.name, seen[dim.name])}: keep that, fix one "
                          f"value ({dim.name}=V), or start another study with --study NAME") from None


def _describe(name: str, dist) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"{name}=" + ",".join(_fmt(c) for c in dist.choices)
    return f"{name}={_fmt(dist.low)}:{_fmt(dist.high)}" + (":log" if dist.log else "")


def suggest(trial, space: dict[str, Dim]) -> dict[str, Any]:
    """Every dimension's value for this trial (fixed ones included), in the space's order."""
    out = {}
    for dim in space.values():
        if dim.kind == "fixed":
            out[dim.name] = dim.value
        elif dim.kind == "choice":
            out[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        elif dim.integer:
            out[dim.name] = trial.suggest_int(dim.name, dim.low, dim.high, log=dim.log)
        else:
            out[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
    return out


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
    from .. import models as M
    from ..train.recipes import optimizer_steps_per_epoch
    from ..train.loop import Trainer

    settings = {k: v for k, v in params.items() if k != "freeze"}
    cfg = cfg.replace(**settings, log_every=0)
    batches = max(1, math.ceil(len(splits.train) / cfg.batch_size))
    span = epochs or max(1, math.ceil((steps or 1) / optimizer_steps_per_epoch(batches, cfg.accumulate)))
    cfg = cfg.replace(epochs=span, schedule_start=0)  # cosine/onecycle schedules span the trial (from its 0)
    built = dataclasses.replace(init, module=copy.deepcopy(init.module))
    if "freeze" in params:
        M.freeze(built, ["none"])
        if params["freeze"] == "backbone":
            M.freeze(built, ["backbone"])
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

    def _metric(self, val: dict) -> float:
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
            v = self._metric(tr.evaluate("val"))
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
        v = run._metric(info["val"])
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
    from .. import models as M
    from ..store.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    twin = dataclasses.replace(built, module=copy.deepcopy(built.module))
    try:
        M.restore_weights(twin.module, state["model"], state.get("frozen", []))
    except PgError:
        raise PgError(f"this study's trials start from weights ({path}) that do not fit the current model: load the "
                      "model the study began with, or start another study with --study NAME") from None
    return twin
