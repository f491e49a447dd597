"""TensorBoard event files for a run: torch.utils.tensorboard.SummaryWriter, fed from the training callbacks.

Scalars (global step = the training step, as in metrics.csv):
  batch/loss, batch/accuracy, batch/lr                  every training batch
  epoch/train_loss, epoch/train_accuracy, epoch/val_loss, epoch/val_accuracy   every epoch end
and at the end of a run the settings with its final metrics (add_hparams, in a sub-folder `hparams-STEP`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from ..errors import PgError
from ..train.events import Handler

INSTALL = "TensorBoard is not installed: pip install 'pgshell[tensorboard]' (or pip install tensorboard)"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    def __init__(self, folder: str | os.PathLike, start_step: int = 0):
        if not available():
            raise PgError(INSTALL)
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        # purge_step: a run resumed from a checkpoint at step S hides any events past S written by a run that went
        # on without saving (the same rule as metrics.csv's truncate_after)
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=start_step + 1 if start_step else None)

    def batch(self, info: dict) -> None:
        step = int(info["step"])
        for key in ("loss", "accuracy", "lr"):
            v = info.get(key)
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(f"batch/{key}", v, step)

    def epoch(self, info: dict) -> None:
        step = int(info["step"])
        for key in ("train_loss", "train_accuracy"):
            if info.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", info[key], step)
        val = info.get("val") or {}
        for key in ("loss", "accuracy"):
            if key in val:
                self.writer.add_scalar(f"epoch/val_{key}", val[key], step)
        self.writer.flush()

    def hparams(self, settings: dict, metrics: dict, step: int) -> None:
        hp = {k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))}
        final = {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if final:
            self.writer.add_hparams(hp, final, run_name=f"hparams-{step}", global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class TensorBoardHandler(Handler):
    """The event files of one run, fed by the loop: batch and epoch scalars; at a run's end (done or stopped) its
    settings with the final metrics. Not essential: a full disk here is reported once and training goes on."""

    order = 30

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder, self.settings, self.tb = folder, settings, None

    def before_fit(self, tr, ctx) -> None:
        self.tb = TensorBoardLog(self.folder, start_step=tr.pos.step)

    def after_batch(self, tr, ctx) -> None:
        self.tb.batch(ctx.row)

    def after_epoch(self, tr, ctx) -> None:
        self.tb.epoch(ctx.info)

    def after_fit(self, tr, ctx) -> None:
        if self.tb is None:
            return
        try:
            if ctx.outcome in ("done", "stopped"):
                last = {k: v for k, v in tr.last.items() if not k.startswith("epoch_")}
                self.tb.hparams(self.settings, last, tr.pos.step)
        finally:
            self.tb.close()
            self.tb = None
