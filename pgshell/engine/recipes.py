"""Training recipes as loop handlers, built from the settings (EMA, mixup/cutmix, early stopping, accumulation,
clipping, ...). `config_handlers(tr)` is called by `Trainer.setup()`; each handler it returns is attached to the
trainer's events for the run (see engine/events.py)."""

from __future__ import annotations


def config_handlers(tr) -> list:
    """The handlers the trainer's settings (`tr.cfg`) ask for."""
    return []
