"""Training: the one loop (Trainer), its events and handlers (recipes, progress, the metrics log), lr schedules,
the device/precision runtime, DDP, the LR range test. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "Position": "loop", "RunResult": "loop", "fresh_state": "loop", "position_rng": "loop", "restore_rng": "loop",
    "step_seed": "loop", "make_loss": "loop", "Trainer": "loop", "EVENTS": "events",
    "Handler": "events", "Ctx": "events", "Events": "events", "config_handlers": "recipes", "needs_images": "recipes",
    "sample_weights": "recipes", "class_loss_weights": "recipes", "soft_target_loss": "recipes",
    "WeightedLoss": "recipes", "mix_seed": "recipes", "mix_batch": "recipes", "MixupCutmix": "recipes",
    "optimizer_steps_per_epoch": "recipes", "Accumulate": "recipes", "ClipGrad": "recipes", "WeightEma": "recipes",
    "ema_module": "recipes", "live_ema_module": "recipes", "EarlyStopping": "recipes", "layer_scales": "recipes",
    "no_weight_decay": "recipes", "describe_groups": "recipes", "total_steps": "schedule", "lr_factor": "schedule",
    "cosine_factor": "schedule", "onecycle_factor": "schedule", "schedule_notice": "schedule",
    "phase_notice": "schedule", "Runtime": "device", "resolve_runtime": "device", "World": "distributed",
    "world": "distributed", "init_from_env": "distributed", "shutdown": "distributed", "all_sum": "distributed",
    "agree": "distributed", "Progress": "progress", "phase_status": "progress", "MetricsLog": "metrics",
    "MetricsLogger": "metrics", "read_rows": "metrics", "read_rows_counted": "metrics", "RangeTest": "lrfind",
    "suggest": "lrfind", "build_optimizer": "optim", "param_groups": "optim",
    "optimizer_names": "timm_optimizers", "range_test_trainer": "lrfind", "RangeTestSchedule": "lrfind", "run_range_test": "lrfind",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
