"""Progress of any job that runs through the loop (training, a range test, a tuning trial): the status the toolbar
shows (position, loss, rate, ETA), a phase while the loop is busy elsewhere (validation, a cache build), and in
scripts a line every `log_every` batches. One handler, so every job reports the same way."""

from __future__ import annotations

import time
from typing import Callable

from .events import Handler


class Progress(Handler):
    """`report(status)` gets a fresh status dict after each batch; `remaining(tr)` says how many optimizer steps
    the job has left (for the ETA: the position counts steps); `tags()` adds the job's own keys (a trial number, ...)."""

    order = 20

    def __init__(self, report: Callable[[dict], None], remaining: Callable[..., int], job: str = "train",
                 tags: Callable[[], dict] = dict):
        self.report, self.remaining, self.job, self.tags = report, remaining, job, tags
        self.t0, self.start_step, self.images = 0.0, 0, 0

    def before_fit(self, tr, ctx) -> None:
        self.t0, self.start_step, self.images = time.perf_counter(), tr.pos.step, 0
        self.report({"state": "training", "job": self.job, "epoch": tr.pos.epoch + 1, **self.tags()})

    def after_batch(self, tr, ctx) -> None:
        row = ctx.row
        self.images += row["images"]
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.images / elapsed
        eta = self.remaining(tr) * elapsed / max(1, tr.pos.step - self.start_step)
        self.report({"state": "training", "job": self.job, "epoch": row["epoch"], "batch": row["batch"],
                     "batches": row["batches"], "step": row["step"], "loss": row["loss"],
                     "accuracy": row["accuracy"], "lr": row["lr"], "rate": rate, "eta": eta, **self.tags()})
        if tr.cfg.log_every and row["batch"] % tr.cfg.log_every == 0:
            tr.notify(f"epoch {row['epoch']} batch {row['batch']}/{row['batches']} loss {row['loss']:.4f} "
                      f"acc {row['accuracy']:.3f} {rate:.0f} img/s")

    def before_validate(self, tr, ctx) -> None:
        self.report({"state": "training", "job": self.job, "phase": "validation pass", "epoch": tr.pos.epoch + 1,
                     **self.tags()})


def phase_status(job: str, name: str, done: int, total: int, started: float,
                 done_then: int = 0) -> dict:
    """The status of a long step outside the batches (a feature-cache build, an input-cache decode), `done_then`
    of it done at `started`; the ETA is None until some of it has been timed."""
    elapsed = time.perf_counter() - started
    eta = elapsed * (total - done) / (done - done_then) if done > done_then else None
    return {"state": "training", "job": job, "phase": name, "done": done, "total": total, "eta": eta}
