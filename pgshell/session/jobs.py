"""The background jobs' shape, the handlers every job trains with, and training's own job (`TrainJob`); the
learning-rate range test's and the tuning study's jobs are in study.py.

A job has a `label` and `run(worker)`, returning "done", "paused" or "stopped"; the worker runs it in its thread and
runs it again on `continue` when it paused. Every job trains through the one loop (`Trainer.run`) with the same
handlers: the worker's `Control` (queued changes, pause, stop), `Progress` (the toolbar's status and ETA), the
session's batch listeners, and its own (checkpoints, the range test's schedule, pruning).
"""

from __future__ import annotations

from typing import Callable

from ..engine.train.events import Handler
from ..engine.train.progress import Progress

RESTART = "restart"  # the reason of a pause a change asks for (freeze mid-run): the run carries on at once


class Listeners(Handler):
    """The session's `batch_listeners`: plain functions called after each batch with its row (and the job's tags)."""

    order = 25

    def __init__(self, session, tags: Callable[[], dict]):
        self.session, self.tags = session, tags

    def after_batch(self, tr, ctx) -> None:
        for listener in list(self.session.batch_listeners):
            listener(dict(ctx.row, **self.tags()))


def loop_handlers(session, worker, job: str, remaining: Callable[..., int], tags: Callable[[], dict] = dict) -> list:
    """The handlers every job's run gets: control, progress and the listeners."""
    def report(status: dict) -> None:
        worker.status = status

    def all_tags() -> dict:
        return {"job": job, **tags()}

    return [worker.control, Progress(report, remaining, job, tags), Listeners(session, all_tags)]


# ====================================================================== training
class EpochReport(Handler):
    """After the epoch's checkpoint: the bad validation images into quarantine, and the epoch's line."""

    order = 95

    def __init__(self, session):
        self.session = session

    def after_epoch(self, tr, ctx) -> None:
        info, val = ctx.info, ctx.info["val"]
        if val and val.get("bad"):
            self.session.report_bad(val["bad"])
        msg = f"epoch {info['epoch']} done: train loss {info['train_loss']:.4f} acc {info['train_accuracy']:.3f}"
        if val:
            msg += f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}"
        if tr.cfg.label_smoothing:  # both losses are the smoothed one: never as low as plain cross-entropy
            msg += f" (losses with label smoothing {tr.cfg.label_smoothing:g})"
        self.session.notify(msg + f" | checkpoint {ctx.extra['checkpoint'].name}")


class TrainJob:
    """`train` / `continue`: the session's trainer towards the session's target (an epoch or a step)."""

    label = "train"

    def __init__(self, session):
        self.session = session
        self.batches, self.images, self.seconds = 0, 0, 0.0  # the whole `train` command, across pauses and saves

    def remaining(self, tr) -> int:
        """Optimizer steps left to the target (Progress's ETA counts in steps)."""
        t = self.session.target
        if "step" in t:
            return t["step"] - tr.pos.step
        return tr.steps_to_epoch(t["epoch"])

    def run(self, worker) -> str:
        s = self.session
        if s.target.get("unfreeze_at") is not None:  # `finetune`'s first phase: the head, up to that epoch
            outcome = self._run(worker, {"epoch": s.target["unfreeze_at"]})
            if outcome != "done":
                return outcome
            s.finetune_second_phase()
        return self._run(worker, s.target)

    def _run(self, worker, t: dict) -> str:
        s, tr = self.session, self.session.trainer
        handlers = [*loop_handlers(s, worker, self.label, self.remaining), s.saver, EpochReport(s)]
        if s.config.tensorboard:
            from ..engine.report.tensorboard import TensorBoardHandler

            handlers.append(TensorBoardHandler(s.folder / "tensorboard", {"model": s.spec.name, **s.config.to_dict()}))
        batches = images = seconds = 0
        while True:  # a restart (a freeze applied mid-run) ends the run at a batch boundary and starts it again
            if "step" in t:
                res = tr.run(steps=t["step"] - tr.pos.step, handlers=handlers)
            else:
                res = tr.run(epochs=t["epoch"] - tr.pos.epoch, handlers=handlers)
            batches, images, seconds = batches + res.batches, images + res.images, seconds + res.seconds
            if not (res.outcome == "paused" and tr.request_reason == RESTART):
                break
        res.batches, res.images, res.seconds = batches, images, seconds
        if not (res.outcome == "done" and t is not s.target):  # the end of finetune's first phase is not the end
            self._report(res)
        return res.outcome

    def _report(self, res) -> None:
        from .describe import where

        s, tr = self.session, self.session.trainer
        self.batches, self.images, self.seconds = (self.batches + res.batches, self.images + res.images,
                                                   self.seconds + res.seconds)
        at = where(tr.pos, tr.steps_per_epoch_now)
        if res.outcome == "done":
            s.run_ended()
            if tr.pos.batch:  # stopped mid-epoch by a step count: a checkpoint of exactly here
                s.write_checkpoint("step")
            else:
                s.write_session_file()
            s.notify(f"done: {self.batches} batches, {self.images} images in {self.seconds:.1f} s "
                     f"({self.images / max(self.seconds, 1e-9):.0f} img/s) — at {at}")
            self._best(s)
        elif res.outcome == "paused":
            path = s.write_checkpoint("pause")
            if not s.saving:
                s.notify(f"paused at {at}; checkpoint {path.name} — `continue` resumes")
        else:
            s.run_ended()
            path = s.write_checkpoint("pause")
            s.notify(f"stopped at {at}; checkpoint {path.name}")
            self._best(s)

    @staticmethod
    def _best(s) -> None:
        from .describe import best_line

        line = best_line(s)
        if line:
            s.notify(line)
