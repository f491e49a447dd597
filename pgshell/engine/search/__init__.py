"""Hyper-parameter search: the space and its --space syntax, Optuna sampler and pruner, one trial. Names are
re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "Dim": "space", "default_space": "space", "parse_space": "space", "format_space": "space",
    "distribution": "space", "check_compatible": "space", "suggest": "space", "check_storage": "trials",
    "make_sampler": "trials", "make_pruner": "trials", "trial_trainer": "trials", "TrialRun": "trials",
    "save_initial": "trials", "load_initial": "trials",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
