"""The search space as plain data (`Dim`s): its default and the `--space` syntax, e.g. `lr=1e-5:1e-1:log
optimizer=sgd,adamw batch_size=16,32 label_smoothing=0:0.2 freeze=none`: `LOW:HIGH[:log]` is a range, `A,B,...` a
choice, a single value is fixed (every trial uses it), `NAME=-` leaves NAME out (trials keep the session's own
setting). Entries override the default space of the same name and add new names. Optuna's distributions for a space,
and the check that a stored study searched the same one. Importing this module imports neither torch nor optuna.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import SETTINGS, parse_value
from ..errors import PgError


# Settings a search may vary; `freeze` is the model's trainable part (backbone: only the head trains; none: all).
SEARCHABLE = ("lr", "weight_decay", "optimizer", "batch_size", "freeze", "label_smoothing", "momentum", "nesterov",
              "backbone_lr_scale", "scheduler", "step_size", "gamma", "warmup_epochs", "criterion", "augment",
              # the augmentation policy and the recipes (engine/train/recipes.py)
              "crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter", "auto_augment", "random_erasing",
              "crop_pct", "ema", "mixup", "cutmix", "mix_prob", "layer_decay", "accumulate", "clip_grad",
              "class_weights", "sampler", "tta")
FREEZE_CHOICES = ("backbone", "none")
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
