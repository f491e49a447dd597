"""Hyper-parameter search: the space and its --space syntax, Optuna sampler and pruner, one trial. Names are
re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    space: Dim default_space parse_space format_space distribution check_compatible suggest
    trials: check_storage make_sampler make_pruner trial_trainer TrialRun save_initial load_initial
""")

__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
