"""pgshell's engine: models, data, the training loop, checkpoints, the metrics log, evaluation, graphs, export and
TensorBoard. torch, torchvision, timm, PIL and matplotlib only — never cmd2 or prompt_toolkit.

The public names are re-exported here lazily, so `import pgshell.engine` (and the shell's start-up) does not pay for
importing torch until something is used.
"""

from importlib import import_module

from .config import TrainConfig
from .errors import PgError

_EXPORTS = {
    "ModelSpec": "models", "BuiltModel": "models", "build_model": "models", "list_models": "models",
    "resolve_name": "models", "freeze": "models", "unfreeze": "models", "count_params": "models",
    "read_weights": "models",
    "Splits": "data", "resolve_data": "data", "scan_folder": "data", "build_transform": "data", "ImageDataset": "data",
    "Trainer": "train", "Position": "train",
    "Handler": "events", "Events": "events", "Ctx": "events",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_latest": "checkpoint",
    "MetricsLog": "metrics", "read_rows": "metrics",
    "Runtime": "device", "resolve_runtime": "device",
    "evaluate_dataset": "evaluate", "classification_report": "evaluate", "predict_files": "evaluate",
    "plot_series": "plot", "draw_png": "plot", "draw_text": "plot", "export_model": "export", "export_timm": "export",
    "TensorBoardLog": "tensorboard", "lr_factor": "schedule", "schedule_notice": "schedule",
}

__all__ = ["TrainConfig", "PgError", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
