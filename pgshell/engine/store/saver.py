"""Epoch checkpoints, the best one and retention (timm's CheckpointSaver, as a loop handler).

At every epoch end the saver writes `epoch-NNNN.safetensors` (pauses and saves write `step-NNNNNNN.safetensors`
through `save`), keeps track of the best by `best_metric` (ties keep the earlier), tells its owner (who rewrites the
session file: before retention, so that file never names a checkpoint retention removed), then applies `keep_last`.

Disk: only the newest checkpoint — the resume point the session file names — keeps the full training state
(optimizer, scaler, schedule). Once a newer one exists, the one before it is rewritten "slim": the weights and what
evaluation needs (handler state such as an EMA, the position, the settings), about half the size with SGD momentum
and a third with Adam. Every epoch can still be evaluated, forked or exported; only the newest can be resumed exactly.
"""


from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Callable

from ..train.events import Handler

SLIM = ("optimizer", "scheduler", "scaler")  # the training state only a resume needs


class _Checkpoint:
    """checkpoint.py imports torch: loaded at the first save, so the shell starts without it."""

    def __getattr__(self, name):
        from . import checkpoint

        return getattr(checkpoint, name)


C = _Checkpoint()


class CheckpointSaver(Handler):
    order = 90  # after every handler whose state the checkpoint holds
    essential = True  # a run that cannot checkpoint must not go on as if it could

    def __init__(self, on_saved: Callable[[Path], None] = lambda path: None):
        self.folder: Path | None = None  # sessions/NAME/checkpoints
        self.root: Path | None = None  # best["path"] is relative to it (sessions/)
        self.latest: Path | None = None
        self.best: dict | None = None  # {"path", "value", "epoch", "metric"}
        self.log = None  # the metrics log, synced before each checkpoint
        self.writes = True  # False in DDP processes other than rank 0
        self.lineage = ""  # the run these checkpoints continue (in each header): reopening never mixes two runs
        self.on_saved = on_saved

    def after_epoch(self, tr, ctx) -> None:
        ctx.extra["checkpoint"] = self.save(tr.state_dict(), "epoch", ctx.info.get("val"), tr.cfg)

    def save(self, state: dict, kind: str, val: dict | None, cfg) -> Path:
        pos = state["position"]
        name = f"epoch-{pos['epoch']:04d}.safetensors" if kind == "epoch" else f"step-{pos['step']:07d}.safetensors"
        path = self.folder / name
        if not self.writes:
            return path
        if self.lineage and path.exists() and _lineage_of(path) != self.lineage:
            # another run's checkpoint at this position (a new run starts where the last one stopped): kept as is
            path = self.folder / f"{path.stem}-{self.lineage}.safetensors"
        summary = {"kind": kind, "step": pos["step"], "epoch": pos["epoch"], "batch": pos["batch"],
                   "time": datetime.now().isoformat(timespec="seconds")}
        if self.lineage:
            summary["lineage"] = self.lineage
        if val:
            summary.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if self.log is not None:
            self.log.sync()
        C.save_checkpoint(path, state, {**summary, "resumable": True})
        previous, self.latest = self.latest, path
        if kind == "epoch" and val:
            self._track_best(path, val, pos["epoch"], cfg.best_metric)
        self.on_saved(path)
        self._apply_retention(cfg.keep_last)
        if previous is not None and previous != path:
            slim(previous)
        return path

    def _track_best(self, path: Path, val: dict, epoch: int, metric: str) -> None:
        value = val["accuracy"] if metric == "val_accuracy" else val["loss"]
        if self.best is not None and self.best.get("metric") != metric:
            # `set best_metric` changed what "best" means: judge the epoch checkpoints kept so far by it, rather
            # than crowning whichever epoch comes next
            self.rejudge(path.parent, metric, skip=path)
        self._consider(path, value, epoch, metric)

    def rejudge(self, folder: Path, metric: str, skip: Path | None = None) -> None:
        """The best of the epoch checkpoints in `folder` by `metric`, from their headers (they hold both metrics);
        also what a fork's folder starts with."""
        self.best = None
        for p in C.list_checkpoint_files(folder):
            if not p.name.startswith("epoch-") or p == skip:
                continue
            try:
                meta = C.read_metadata(p)
            except C.CheckpointError:
                continue
            if metric in meta:
                self._consider(p, float(meta[metric]), int(meta.get("epoch", 0)), metric)

    def _consider(self, path: Path, value: float, epoch: int, metric: str) -> None:
        better = (self.best is None
                  or (value > self.best["value"] if metric == "val_accuracy" else value < self.best["value"]))
        if better:  # ties keep the earlier checkpoint
            self.best = {"path": str(path.relative_to(self.root)), "value": value, "epoch": epoch, "metric": metric}

    def _apply_retention(self, keep_last: int) -> None:
        if not keep_last:
            return
        keep = {self.latest.resolve()}
        if self.best:
            keep.add((self.root / self.best["path"]).resolve())
        epochs = [p for p in C.list_checkpoint_files(self.folder) if p.name.startswith("epoch-")]
        keep.update(p.resolve() for p in epochs[-keep_last:])
        for p in C.list_checkpoint_files(self.folder):
            if p.resolve() not in keep and p.name.startswith(("epoch-", "step-")):
                # pause checkpoints older than the newest epoch checkpoint are superseded too
                try:
                    p.unlink()
                except OSError:
                    pass


def slim(path: Path) -> bool:
    """Rewrite a superseded checkpoint without the training state only a resume needs; False if there was none to
    drop (already slim, gone, or unreadable — then it is left as it is)."""
    try:
        meta = C.read_metadata(path)
        if meta.get("resumable") != "True":
            return False
        state = C.load_checkpoint(path)
    except (C.CheckpointError, FileNotFoundError):
        return False
    summary = {k: v for k, v in meta.items() if k not in ("format", "version", "state", "sha256")}
    C.save_checkpoint(path, {**state, **{k: None for k in SLIM}}, {**summary, "resumable": False})
    return True


def _lineage_of(path: Path) -> str | None:
    try:
        return C.read_metadata(path).get("lineage")
    except C.CheckpointError:
        return None
