"""pgshell's engine: torch, torchvision, timm, PIL and matplotlib only — never cmd2 or prompt_toolkit. One folder per
concern: models/ (catalogue, build, weights, freezing, soups), data/ (sources -> Splits, images, transforms, sampling),
batches/ (the batch sources and the choice among them), train/ (the loop, its events and handlers, schedules, device),
store/ (checkpoints, the saver, digests), report/ (evaluation, plots, export, explain, probes, audit, TensorBoard),
search/ (the space and trials); config, errors, names and rng beside them.

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
    "Trainer": "train.loop", "Position": "train.loop",
    "Handler": "train.events", "Events": "train.events", "Ctx": "train.events",
    "save_checkpoint": "store.checkpoint", "load_checkpoint": "store.checkpoint", "load_latest": "store.checkpoint",
    "MetricsLog": "train.metrics", "read_rows": "train.metrics",
    "Runtime": "train.device", "resolve_runtime": "train.device",
    "evaluate_dataset": "report.evaluate", "classification_report": "report.evaluate",
    "predict_files": "report.evaluate", "plot_series": "report.plot", "draw_png": "report.plot",
    "draw_text": "report.plot",
    "export_model": "report.export", "export_timm": "report.export",
    "TensorBoardLog": "report.tensorboard", "lr_factor": "train.schedule", "schedule_notice": "train.schedule",
}

__all__ = ["TrainConfig", "PgError", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
