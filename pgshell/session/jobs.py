"""The background jobs: training, the learning-rate range test and the tuning study — one shape.

A job has a `label` and `run(worker)`, returning "done", "paused" or "stopped"; the worker runs it in its thread and
runs it again on `continue` when it paused. Every job trains through the one loop (`Trainer.run`) with the same
handlers: the worker's `Control` (queued changes, pause, stop), `Progress` (the toolbar's status and ETA), the
session's batch listeners, and its own (checkpoints, the range test's schedule, pruning).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from ..engine.errors import PgError
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


# ====================================================================== LR range test
class LRFindJob:
    """`lrfind`: a RangeTest driven through a Trainer on copies of the model and optimizer."""

    label = "lrfind"

    def __init__(self, session, test, trainer, out: str | None = None):
        self.session, self.test, self.trainer, self.out = session, test, trainer, out

    def run(self, worker) -> str:
        from ..engine.rng import preserved_rng
        from ..engine.train.lrfind import run_range_test
        from .study import finish_lrfind

        test = self.test
        handlers = loop_handlers(self.session, worker, self.label, lambda tr: test.steps - len(test.lrs),
                                 lambda: {"batch": len(test.lrs), "batches": test.steps})
        with preserved_rng():
            outcome = run_range_test(self.trainer, test, handlers)
        if outcome == "stopped":
            self.session.notify("lrfind stopped; the session is unchanged")
        if outcome == "done":
            finish_lrfind(self.session, test, self.out)
        return outcome


# ====================================================================== tuning
class TuneJob:
    """`tune`: asks the study for trials and trains each through TrialRun until `trials` more have finished
    (complete or pruned). Pausing keeps the current trial in memory; `continue` carries on with it exactly."""

    label = "tune"

    def __init__(self, session, study, space, metric: str, epochs: int | None, steps: int | None, trials: int,
                 init, trial_prefix: str):
        from ..engine.train.metrics import MetricsLog
        from .study import session_key

        self.session, self.study, self.space, self.metric = session, study, space, metric
        self.epochs, self.steps, self.trials, self.init = epochs, steps, trials, init
        self.trial_prefix = trial_prefix
        self.key = session_key(session)
        self.log = MetricsLog(session.folder / "trials" / "metrics.csv")
        self.finished = 0
        self.failures_in_row = 0
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.current: tuple[Any, Any, float] | None = None  # (optuna trial, TrialRun, seconds spent) of a paused one

    def run(self, worker) -> str:
        from ..engine.rng import preserved_rng

        worker.status = {"state": "training", "job": self.label, "trials_done": self.finished, "trials": self.trials}
        try:
            with preserved_rng():
                while self.finished < self.trials:
                    if self.current is None:
                        request = worker.check()  # between trials too: a pause or stop needs no trial
                        if request:
                            self.session.notify(f"tune {'paused' if request == 'pause' else 'stopped'} between "
                                                "trials" + (" — `continue` resumes" if request == "pause" else ""))
                            return "paused" if request == "pause" else "stopped"
                        self.current = self._next_trial()
                        if self.current is None:
                            continue
                    outcome = self._run_current(worker)
                    if outcome in ("paused", "stopped"):
                        return outcome
        finally:
            self.log.sync()
            self.log.close()  # reopened on the next append (a `continue`)
        self._report_done()
        return "done"

    def _next_trial(self):
        from ..engine.search.trials import TrialRun, suggest, trial_trainer

        s = self.session
        trial = self.study.ask()
        try:
            trial.set_user_attr("session", self.key)
            params = suggest(trial, self.space)
            trial.set_user_attr("fixed", {d.name: d.value for d in self.space.values() if d.kind == "fixed"})
            trial.set_user_attr("budget", {"epochs": self.epochs} if self.epochs else {"steps": self.steps})
            trainer = trial_trainer(self.init, s.spec, s.splits, s.config, params,
                                    size=(s.data or {}).get("size", 0), log=self.log,
                                    label=f"{self.trial_prefix}{trial.number}", epochs=self.epochs, steps=self.steps)
        except Exception as e:
            self._fail(trial, e)
            return None
        return trial, TrialRun(trial, trainer, self.metric, epochs=self.epochs, steps=self.steps), 0.0

    def _handlers(self, worker, trial, run) -> list:
        tr = run.trainer
        total = self.epochs * tr.optimizer_steps_per_epoch if self.epochs else self.steps  # optimizer steps

        def remaining(tr) -> int:
            return max(0, total - tr.pos.step) + (self.trials - self.finished - 1) * total

        def tags() -> dict:
            return {"trial": trial.number, "trials_done": self.finished, "trials": self.trials}

        return loop_handlers(self.session, worker, self.label, remaining, tags)

    def _run_current(self, worker) -> str:
        trial, run, spent = self.current
        t0 = time.perf_counter()
        try:
            outcome = run.run(self._handlers(worker, trial, run))
        except Exception as e:  # one failing trial (out of memory at batch 64, say) must not end the search
            self.current = None
            self._fail(trial, e)
            return "failed"
        spent += time.perf_counter() - t0
        self.current = (trial, run, spent)
        if outcome == "paused":
            self.session.notify(f"trial {trial.number} paused at epoch {run.trainer.pos.epoch + 1} batch "
                                f"{run.trainer.pos.batch} — `continue` resumes it")
            return outcome
        self.current = None
        if outcome == "stopped":
            self._stopped(trial)
        else:
            self._finished(trial, run, outcome, spent)
        return outcome

    def _stopped(self, trial) -> None:
        from .study import optuna_module

        trial.set_user_attr("reason", "stopped")
        self.study.tell(trial, state=optuna_module().trial.TrialState.FAIL)
        if trial.params:
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        self.session.notify(f"trial {trial.number} stopped (marked failed); the next `tune` runs it again first")

    def _finished(self, trial, run, outcome: str, spent: float) -> None:
        from .study import optuna_module, params_text

        self.failures_in_row = 0
        self.finished += 1
        params = params_text(trial, self.space)
        if outcome == "pruned":
            trial.set_user_attr("reason", run.reason)
            self.study.tell(trial, state=optuna_module().trial.TrialState.PRUNED)
            self.counts["pruned"] += 1
            last = max(run.curve) if run.curve else 0
            where = f"at epoch {last}" if self.epochs and last else f"at step {run.trainer.pos.step}"
            value = f": {self.metric} {run.curve[last]:.4f}" if run.curve and math.isfinite(run.curve[last]) else ""
            self.session.notify(f"trial {trial.number} {run.reason} {where}{value} ({params}) in {spent:.1f} s")
        else:
            self.study.tell(trial, run.value)
            self.counts["complete"] += 1
            self.session.notify(f"trial {trial.number} complete: {self.metric} {run.value:.4f} ({params}) "
                                f"in {spent:.1f} s")

    def _fail(self, trial, e: Exception) -> None:
        from .files import log_error
        from .study import optuna_module

        s = self.session
        log_error(s.folder, e)
        msg = str(e) if isinstance(e, PgError) else f"{type(e).__name__}: {str(e)[:200]}"
        try:
            trial.set_user_attr("reason", msg[:500])
            self.study.tell(trial, state=optuna_module().trial.TrialState.FAIL)
        except Exception:  # the storage itself is failing: the error below says enough
            pass
        self.counts["failed"] += 1
        self.failures_in_row += 1
        s.notify(f"trial {trial.number} failed: {msg}")
        if self.failures_in_row >= 3:
            self.failures_in_row = 0
            raise PgError(f"3 trials in a row failed (last: {msg}); fix the cause (`--space`, settings), then "
                          "`continue`")

    def _report_done(self) -> None:
        c = self.counts
        msg = f"tune done: {self.finished} trials ({c['complete']} complete, {c['pruned']} pruned"
        msg += f", {c['failed']} failed)" if c["failed"] else ")"
        try:
            best = self.study.best_trial
            msg += f"; best trial {best.number}: {self.metric} {best.value:.4f} — `tune show`, `tune apply`"
        except ValueError:
            msg += "; no trial completed yet"
        self.session.notify(msg)
