"""pgshell's engine: torch, torchvision, timm, PIL and matplotlib only — never cmd2 or prompt_toolkit. One folder per
concern: models/ (catalogue, build, weights, freezing, soups), data/ (sources -> Splits, images, transforms, sampling),
batches/ (the batch sources and the choice among them), train/ (the loop, its events and handlers, schedules, device),
store/ (checkpoints, the saver, digests), report/ (evaluation, plots, export, explain, probes, audit, TensorBoard),
search/ (the space and trials); config, errors, names and rng beside them.

The public names are re-exported here lazily, so `import pgshell.engine` (and the shell's start-up) does not pay for
importing torch until something is used.
"""

from .config import TrainConfig
from .errors import PgError
from .lazy import exports, lazy_getattr

_EXPORTS = exports("""
    models: ModelSpec BuiltModel build_model list_models resolve_name freeze unfreeze count_params read_weights
    data: Splits resolve_data scan_folder build_transform ImageDataset
    train.loop: Trainer Position
    train.events: Handler Events Ctx
    store.checkpoint: save_checkpoint load_checkpoint load_latest
    train.metrics: MetricsLog read_rows
    train.device: Runtime resolve_runtime
    report.evaluate: evaluate_dataset classification_report predict_files
    report.plot: plot_series draw_png draw_text
    report.export: export_model export_timm
    report.tensorboard: TensorBoardLog
    train.schedule: lr_factor schedule_notice
""")

__all__ = ["TrainConfig", "PgError", *_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
